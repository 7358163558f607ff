"""``deberta-onnx info``: what a model folder holds, from its manifest."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..contract import TASK_EMBEDDING, TASK_SEQUENCE_CLASSIFICATION
from ..manifest import Manifest, load_manifest

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("info", help="describe a model folder (variants, sizes, validation)",
                                 description="Print what a model folder holds, from its manifest: the source "
                                             "checkpoint, task, graph inputs and outputs, pooling, and each variant "
                                             "with its size and validation against PyTorch.")
    parser.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.model_dir)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    source = manifest.source
    weights = "RANDOM weights (for parity and speed only)" if source.random_weights else "trained weights"
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
            check = f"cosine to PyTorch >= {quality['min_cosine']:.5f} (gate {quality['threshold']:g})"
        else:
            check = f"max|diff| {worst:.1e} vs PyTorch" if worst is not None else "not validated"
        print(f"variant:    {name:<14} {variant.file:<24} {size / 1e6:8.1f} MB   {check}")
    optimization = manifest.optimization
    if optimization.get("enabled"):
        fused = ", ".join(f"{k} {v}" for k, v in sorted(optimization.get("fused_operators", {}).items()))
        print(f"speed-ups:  optimised ({optimization.get('relative_attention_layers_folded', 0)} attention layers "
              f"folded{'; fused ' + fused if fused else ''})")
    else:
        print("speed-ups:  none, attention as transformers writes it (exported with --no-optimize)" if optimization
              else "speed-ups:  not recorded (exported before graph optimisation)")
    print(f"exported:   {manifest.created_at} with {', '.join(f'{k} {v}' for k, v in manifest.versions.items())}")
    return 0


def _print_task(manifest: Manifest) -> None:
    """The task lines of ``info``: what the graph computes and which class runs it."""
    outputs = ", ".join(f"{spec.name} {list(spec.dims)}" for spec in manifest.outputs)
    inputs = ", ".join(spec.name for spec in manifest.inputs)
    if manifest.task == TASK_EMBEDDING:
        print(f"task:       embedding (Encoder)   normalized in the graph: {'yes' if manifest.normalize else 'no'}")
    else:
        sequence = manifest.task == TASK_SEQUENCE_CLASSIFICATION
        runner = "SequenceClassifier, CrossEncoder" if sequence else "TokenClassifier"
        print(f"task:       {manifest.task} ({runner})   labels: {', '.join(manifest.labels)}")
    print(f"graph:      inputs {inputs}; outputs {outputs}")
    st = manifest.source.sentence_transformers
    if st:
        print(f"sentence-transformers modules: {' -> '.join(st['modules'])}")
    triton = manifest.triton
    if triton:
        print(f"triton:     {triton['repository']}/{triton['model_name']}/ (max batch {triton['max_batch_size']})")
