"""``deberta-onnx info``: what a model folder holds, from its manifest."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import tune
from ..config import EncoderConfig
from ..contract import (
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASK_SEQUENCE_CLASSIFICATION,
)
from ..errors import TaskMismatchError
from ..loader import load_model
from ..manifest import Manifest, load_manifest
from ..zero_shot import entailment_index

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("info", help="describe a model folder (variants, sizes, validation)",
                                 description="Print what a model folder holds, from its manifest: the source "
                                             "checkpoint, task, graph inputs and outputs, pooling, and each variant "
                                             "with its size and validation against PyTorch.")
    parser.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    parser.add_argument("--no-check", action="store_true",
                        help="describe the folder from its manifest alone, without checking that it loads (every "
                             "file's checksum, the tokenizer, the graph against the manifest)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.model_dir)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, ensure_ascii=False))
        if not args.no_check:
            _check(manifest)
        return 0
    source = manifest.source
    weights = "RANDOM weights (for parity and speed only)" if source.random_weights else "trained weights"
    if source.outliers:
        ratio = source.outliers.get("measured_ratio")
        weights = (f"RANDOM weights with activation outliers: {len(source.outliers.get('dims', []))} hidden dims at "
                   f"{ratio:,.0f}x the median (for parity, precision and speed checks only)" if ratio else
                   "RANDOM weights with activation outliers (for parity, precision and speed checks only)")
    print(f"model:      {source.model} ({source.architecture}, {weights})")
    print(f"hidden:     {manifest.hidden_size}   max length: {manifest.max_sequence_length} tokens   "
          f"pooling: {manifest.pooling}")
    _print_task(manifest)
    for name, variant in manifest.variants.items():
        entry = manifest.files.get(variant.file)
        size = entry.bytes if entry is not None else 0
        quality = variant.quality or {}
        worst = (variant.validation or {}).get("worst", {}).get("max_abs_diff")
        if quality and "threshold" in quality:
            check = (f"cosine to PyTorch >= {quality['min_cosine']:.8f}, mean {quality['mean_cosine']:.8f} "
                     f"(gate {quality['threshold']:.8f}, recipe {variant.recipe})")
        else:
            check = f"max|diff| {worst:.1e} vs PyTorch" if worst is not None else "not validated"
        print(f"variant:    {name:<14} {variant.file:<24} {size / 1e6:8.1f} MB   {check}")
        for line in _precision_details(variant.nodes or {}, variant.range_audit):
            print(f"            {line}")
    optimization = manifest.optimization
    if optimization.get("enabled"):
        fused = ", ".join(f"{k} {v}" for k, v in sorted(optimization.get("fused_operators", {}).items()))
        print(f"speed-ups:  optimised ({optimization.get('relative_attention_layers_folded', 0)} attention layers "
              f"folded{'; fused ' + fused if fused else ''}"
              f"{'; portable: standard ONNX operators only' if optimization.get('portable') else ''})")
    else:
        print("speed-ups:  none, attention as transformers writes it (exported with --no-optimize)" if optimization
              else "speed-ups:  not recorded (exported before graph optimisation)")
    print(f"exported:   {manifest.created_at} with {', '.join(f'{k} {v}' for k, v in manifest.versions.items())}")
    _print_engines(manifest)
    if not args.no_check:
        print(f"check:      {_check(manifest)}")
    return 0


def _check(manifest: Manifest) -> str:
    """Checks that the folder loads as the runtime would load it (every file's checksum, then the variant the CPU
    picks, its tokenizer and graph against the manifest); returns a line saying so.

    Raises:
        ModelFolderError: (or another named error) what the runtime would refuse, as it would say it.
    """
    manifest.verify_files(sorted(manifest.files))
    loaded = load_model(manifest.folder, None, EncoderConfig(verify_checksums=False), tasks=(manifest.task,),
                        user="deberta-onnx info")
    return (f"loads ({loaded.precision} on {loaded.provider}; the checksums of all "
            f"{len(manifest.files)} files verified)")


def _print_engines(manifest: Manifest) -> None:
    """The engines lines of ``info``: what is installed here, whether bf16 can run, and what ``--engine auto``
    runs for this folder on this machine (the choices ``deberta-onnx tune`` or a first load measured)."""
    import onnxruntime

    from ..openvino_engine import bf16_support, openvino_version

    version = openvino_version()
    if version is None:
        print(f"engines:    onnxruntime {onnxruntime.__version__}; openvino not installed "
              "(pip install 'deberta-onnx[openvino]'; --engine auto then runs ONNX Runtime)")
        return
    supported, detail = bf16_support()
    print(f"engines:    onnxruntime {onnxruntime.__version__}; openvino {version} (bf16 "
          f"{'available' if supported else 'unavailable'}: {detail})")
    graphs = {entry.sha256: name for name, variant in manifest.variants.items()
              if (entry := manifest.files.get(variant.file)) is not None}
    choices = tune.choices_for(tune.tune_file(), graphs)
    if not choices:
        print(f"auto:       not measured on this machine yet (the first load with --engine auto measures it, or "
              f"`deberta-onnx tune {manifest.folder}`)")
    for choice in choices:
        threads = choice.get("threads")
        print(f"auto:       {choice.get('precision')} with {threads if threads is not None else 'default'} threads "
              f"runs {tune.engine_label(choice)}: {choice.get('reason')} on {choice.get('measured_at')}")


def _precision_details(nodes: dict[str, Any], audit: dict[str, Any] | None) -> list[str]:
    """What runs in which precision in a derived variant: MatMuls by precision, outlier channels split off into
    fp32, MatMuls kept fp32, and the fp16 range audit."""
    lines = []
    matmuls = nodes.get("matmuls") or {}
    if matmuls:
        counts = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in sorted(matmuls.items()))
        lines.append(f"MatMuls: {counts}; word embeddings {nodes.get('embeddings', '?')}")
    split = nodes.get("outlier_split") or {}
    if split.get("matmuls_split"):
        channels = sum(len(found) for found in split.get("tensors", {}).values())
        lines.append(f"outlier channels: {channels} in {len(split.get('tensors', {}))} tensors computed in fp32 beside "
                     f"{split['matmuls_split']} int8 MatMuls")
    kept = nodes.get("kept_fp32") or []
    if kept:
        lines.append(f"kept fp32 by sensitivity: {len(kept)} weight MatMuls ({', '.join(kept[:4])}"
                     f"{', ...' if len(kept) > 4 else ''})")
    if audit:
        held = audit.get("kept_fp32") or {}
        largest = (audit.get("largest_tensors") or [{}])[0].get("max_abs")
        lines.append(f"fp16 range audit: {len(held)} nodes kept fp32 near fp16's range (threshold "
                     f"{audit.get('threshold', 0):.3g}; largest value {largest:.3g} on {audit.get('texts')} texts)"
                     if largest is not None else f"fp16 range audit: {len(held)} nodes kept fp32")
    return lines


def _print_task(manifest: Manifest) -> None:
    """The task lines of ``info``: what the graph computes and which class runs it."""
    outputs = ", ".join(f"{spec.name} {list(spec.dims)}" for spec in manifest.outputs)
    inputs = ", ".join(spec.name for spec in manifest.inputs)
    if manifest.task == TASK_EMBEDDING:
        print(f"task:       embedding (Encoder)   normalized in the graph: {'yes' if manifest.normalize else 'no'}")
    elif manifest.task == TASK_MULTIPLE_CHOICE:
        print(f"task:       {manifest.task} (MultipleChoice; `deberta-onnx multiple-choice`)")
    elif manifest.task == TASK_FILL_MASK:
        print(f"task:       {manifest.task} (FillMask; `deberta-onnx fill-mask`)   mask token: "
              f"{manifest.model.mask_token}")
    elif manifest.task == TASK_QUESTION_ANSWERING:
        print(f"task:       {manifest.task} (QuestionAnswerer)   extractive: answer spans of the context, from "
              "start and end logits")
    else:
        sequence = manifest.task == TASK_SEQUENCE_CLASSIFICATION
        runner = "SequenceClassifier, CrossEncoder" if sequence else "TokenClassifier"
        if sequence and _names_entailment(manifest.labels):
            runner += ", ZeroShotClassifier"
        print(f"task:       {manifest.task} ({runner})   labels: {', '.join(manifest.labels)}")
    print(f"graph:      inputs {inputs}; outputs {outputs}")
    st = manifest.source.sentence_transformers
    if st:
        print(f"sentence-transformers modules: {' -> '.join(st['modules'])}")
    triton = manifest.triton
    if triton:
        print(f"triton:     {triton['repository']}/{triton['model_name']}/ (max batch {triton['max_batch_size']})")


def _names_entailment(labels: tuple[str, ...] | list[str]) -> bool:
    """Whether an NLI model's labels let ``ZeroShotClassifier`` run it."""
    try:
        entailment_index(labels)
    except TaskMismatchError:
        return False
    return True
