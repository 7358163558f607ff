"""``export_model``: checkpoint -> validated model folder (``model.onnx``, ``tokenizer.json``, ``manifest.json``)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.contract import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MODEL_FILE,
    OPSET,
    TASK_EMBEDDING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASKS,
    PRECISIONS,
    SENTENCE_OUTPUT,
    TOKENIZER_FILE,
)
from deberta_onnx.runtime.manifest import sha256_file, write_manifest

from ._checkpoint import LoadedCheckpoint, load_checkpoint, scratch_dir
from ._errors import CheckpointError, ExportError, OutputExistsError
from ._graph import POOLINGS, ClassifierGraph, EmbeddingGraph, export_onnx
from ._optimize import apply_ort_fusions, folded_relative_attention
from ._quiet import quiet_libraries
from ._random import RANDOM_PREFIX, random_source
from ._sentence_transformers import SentenceTransformerSpec, read_sentence_transformer
from ._tokenizer import TOKENIZER_SOURCES, build_tokenizer
from ._triton import triton_name, write_triton_repository
from ._validate import DEFAULT_VALIDATION_SHAPES, format_report, validate
from ._variants import derive_variants, read_calibration

__all__ = ["ExportConfig", "ExportResult", "export_model"]

_PARTIAL = ".partial-"


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Options of ``export_model``; ``deberta-onnx export`` flags map one-to-one onto these fields.

    Attributes:
        overwrite: replace a non-empty OUT_DIR (the old folder is swapped out only once the new one is complete).
        pooling: how token vectors become one sentence vector, fused in the graph: ``"mean"`` (masked mean),
            ``"cls"`` (the first token's vector) or ``"max"`` (masked per-dimension maximum). ``None`` (default):
            a sentence-transformers checkpoint's own Pooling module, else ``"mean"``.
        normalize: L2-normalise the sentence vector inside the graph. ``None`` (default): whether a
            sentence-transformers checkpoint has a Normalize module, else no.
        token_embeddings: add a second output, ``token_embeddings`` ``[batch, sequence, hidden]`` (the last
            hidden state; large, so off by default).
        task: ``"embedding"`` (the encoder and pooling), ``"sequence-classification"`` or
            ``"token-classification"`` (encoder and the checkpoint's head, output ``logits``). ``None``
            (default): what the checkpoint's architecture is (a ``...ForSequenceClassification`` checkpoint
            exports its head); ``"embedding"`` exports only the encoder of any checkpoint.
        max_length: longest input in tokens; default a sentence-transformers checkpoint's ``max_seq_length``,
            else the tokenizer's ``model_max_length``, capped at the model's ``max_position_embeddings``.
        validate: compare ONNX Runtime with PyTorch after export, and run the precisions' quality gate
            (strongly recommended).
        validation_shapes: (batch, sequence) pairs to validate on.
        atol: largest allowed max |diff| between ONNX Runtime and PyTorch.
        tokenizer: where ``tokenizer.json`` comes from: ``"sentencepiece"`` (the checkpoint's ``spm.model``, ids
            identical to SentencePiece's; the default) or ``"transformers"`` (the installed transformers' fast
            tokenizer, for byte-exact agreement with an existing transformers pipeline).
        triton: also write a Triton Inference Server model repository, ``OUT_DIR/triton/<name>/`` (config.pbtxt
            with dynamic batching, the ONNX model under version 1); the tokenizer stays on the client.
        triton_name: its model name; default OUT_DIR's name.
        triton_max_batch_size: Triton's ``max_batch_size``: the largest batch its dynamic batcher forms.
        triton_max_queue_delay_us: how long Triton may hold a request to batch it with others.
        opset: ONNX opset of the graph.
        optimize: apply DeBERTa-specific graph speed-ups (see ``export/_optimize.py``): relative-position
            projections folded into per-layer constants, no per-batch repeat, position bias computed only for
            the distances a sequence can use. Recorded in the manifest; validated like the plain graph.
        seed: seeds the validation inputs.
        quiet: no progress bars or report on stderr.
        precisions: the variants to write (``"fp32"``, ``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``); fp32
            is always written, first, as the reference the others are derived from and compared with.
        calibration: int8-static: a UTF-8 text file, one sentence per line, whose activation ranges fix the
            quantization scales; default the 300 shipped sentences the quality gate does not hold out.
        min_cosine_fp16: the quality gate's threshold for fp16: lowest allowed cosine between a held-out
            sentence's vector and the fp32 PyTorch one.
        min_cosine_int8: the same for int8-dynamic and int8-static.
        fallback: when a precision fails the gate, try its safer recipes in turn (and say so) instead of failing.
    """

    overwrite: bool = False
    pooling: str | None = None
    normalize: bool | None = None
    token_embeddings: bool = False
    task: str | None = None
    max_length: int | None = None
    validate: bool = True
    validation_shapes: tuple[tuple[int, int], ...] = DEFAULT_VALIDATION_SHAPES
    atol: float = 1e-4
    tokenizer: str = "sentencepiece"
    triton: bool = False
    triton_name: str | None = None
    triton_max_batch_size: int = 64
    triton_max_queue_delay_us: int = 1000
    opset: int = OPSET
    optimize: bool = True
    seed: int = 0
    quiet: bool = False
    precisions: tuple[str, ...] = ("fp32",)
    calibration: str | None = None
    min_cosine_fp16: float = 0.999
    min_cosine_int8: float = 0.99
    fallback: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.precisions, str) or not all(isinstance(p, str) for p in self.precisions):
            raise TypeError(
                f"precisions must be a tuple of names, e.g. ('fp32', 'int8-static'), got {self.precisions!r}"
            )
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
        # fp32 first (always written: the others are derived from it), then the rest in canonical order.
        object.__setattr__(self, "precisions", tuple(p for p in PRECISIONS if p == "fp32" or p in self.precisions))
        for name in ("min_cosine_fp16", "min_cosine_int8"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a cosine in (0, 1], got {value!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.triton_name is not None:
            triton_name(self.triton_name)
        if not isinstance(self.triton_max_batch_size, int) or self.triton_max_batch_size < 1:
            raise ValueError(f"triton_max_batch_size must be a positive int, got {self.triton_max_batch_size!r}")
        if not isinstance(self.triton_max_queue_delay_us, int) or self.triton_max_queue_delay_us < 0:
            raise ValueError(f"triton_max_queue_delay_us must be an int >= 0, got {self.triton_max_queue_delay_us!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {self.max_length!r}")
        if self.tokenizer not in TOKENIZER_SOURCES:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZER_SOURCES)}, got {self.tokenizer!r}")
        if not self.atol > 0:
            raise ValueError(f"atol must be positive, got {self.atol!r}")
        for pair in self.validation_shapes:
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"validation_shapes holds (batch, sequence) pairs of positive ints, got {pair!r}")


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` produced: the folder, its manifest, and the seconds it took."""

    out_dir: Path
    manifest: dict[str, Any]
    seconds: float


def export_model(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: ExportConfig | None = None
                 ) -> ExportResult:
    """Exports a DeBERTa checkpoint to ``out_dir``: one ONNX graph (encoder + pooling), tokenizer, manifest.

    The folder is built beside ``out_dir`` and renamed into place at the end, so a failed or interrupted
    export leaves no partial ``out_dir``.

    Args:
        src: a local Hugging Face checkpoint folder, a hub id (offline when cached), or ``random:SHAPE``
            (e.g. ``random:deberta-v3-base``) for a checkpoint of that shape with random weights.
        out_dir: the model folder to write.
        config: export options, see ``ExportConfig``.

    Raises:
        CheckpointError / UnsupportedModelError: the source cannot be loaded or is not DeBERTa.
        OutputExistsError: ``out_dir`` is not empty and ``config.overwrite`` is false.
        ValidationError: ONNX Runtime and PyTorch disagree beyond ``config.atol``.
        ExportError: anything else that stopped the export, writing errors with the path.
    """
    config = config or ExportConfig()
    started = time.perf_counter()
    target = Path(out_dir).absolute()
    _check_target(target, config.overwrite)
    with scratch_dir() as scratch, quiet_libraries():
        source = str(src)
        if source.startswith(RANDOM_PREFIX):
            _say(config, f"building a {source[len(RANDOM_PREFIX):]} checkpoint with RANDOM weights")
            source = random_source(source, scratch)
        sentence_transformer = read_sentence_transformer(source)
        pooling, normalize = _pooling(config, sentence_transformer, str(src))
        if sentence_transformer is not None:
            if config.task not in (None, TASK_EMBEDDING):
                raise ExportError(f"{src} is a sentence-transformers embedding model; it has no {config.task} head.")
            _say(config, f"sentence-transformers checkpoint: {' -> '.join(sentence_transformer.modules)} "
                         f"({pooling} pooling{', normalized' if normalize else ''})")
            source = sentence_transformer.transformer_path
        checkpoint = load_checkpoint(source, task=config.task)
        if checkpoint.task != TASK_EMBEDDING:
            _check_classifier_options(config, checkpoint.task, str(src))
        if str(src).startswith(RANDOM_PREFIX) or sentence_transformer is not None:
            checkpoint.source["model"] = str(src)
        if sentence_transformer is not None:
            checkpoint.source["sentence_transformers"] = sentence_transformer.to_manifest()
        if config.calibration is not None and "int8-static" in config.precisions:
            read_calibration(config.calibration)  # a bad file fails now, not after the export
        with _staging(target, config.overwrite) as staging:
            manifest = _build(checkpoint, staging, config, pooling=pooling, normalize=normalize,
                              sentence_transformer=sentence_transformer,
                              triton_model=config.triton_name or _model_name(target.name),
                              scratch=Path(scratch))
    seconds = time.perf_counter() - started
    _say(config, f"exported {src} to {target} in {seconds:.1f} s")
    return ExportResult(out_dir=target, manifest=manifest, seconds=seconds)


def _pooling(config: ExportConfig, spec: SentenceTransformerSpec | None, src: str) -> tuple[str, bool]:
    """The pooling and normalisation to fuse: the config's where given, else the checkpoint's."""
    if spec is None:
        return config.pooling or "mean", bool(config.normalize)
    for name, asked, own in (("pooling", config.pooling, spec.pooling), ("normalize", config.normalize, spec.normalize)):
        if asked is not None and asked != own:
            raise ExportError(
                f"{src} is a sentence-transformers model whose modules give {name}={own}; {name}={asked} would "
                f"give other vectors than its encode(). Leave {name} unset to take the checkpoint's own, or export "
                "its Transformer folder alone to choose freely."
            )
    return spec.pooling, spec.normalize


def _check_classifier_options(config: ExportConfig, task: str, src: str) -> None:
    # The precisions' quality gate compares sentence vectors; a classifier's logits need another measure.
    lower = ",".join(config.precisions[1:]) or None
    asked = [flag for flag, value in (("--pooling", config.pooling), ("--normalize", config.normalize),
                                      ("--token-embeddings", config.token_embeddings or None),
                                      (f"--precision {lower}", lower)) if value is not None]
    if asked:
        raise ExportError(
            f"{src} is a {task} checkpoint, whose graph outputs logits; {', '.join(asked)} appl"
            f"{'ies' if len(asked) == 1 else 'y'} to embedding graphs. Drop {'it' if len(asked) == 1 else 'them'}, "
            "or pass --task embedding to export the encoder alone."
        )


def _classifier_fields(checkpoint: LoadedCheckpoint) -> dict[str, Any]:
    """The manifest's ``model`` entries of a classifier: labels in logit order, problem type, and a
    cross-encoder's score activation as sentence-transformers saved it."""
    config = checkpoint.config
    labels = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(int(config.num_labels))]
    fields: dict[str, Any] = {"labels": labels, "problem_type": getattr(config, "problem_type", None)}
    if checkpoint.task == TASK_SEQUENCE_CLASSIFICATION:
        saved = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") or getattr(
            config, "sbert_ce_default_activation_function", None)
        fields["score_activation"] = _ACTIVATIONS.get(str(saved).rsplit(".", 1)[-1]) if saved else None
    return fields


# sentence-transformers CrossEncoder activations (saved as a torch class path) the runtime applies.
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


def _model_name(folder_name: str) -> str:
    """A Triton model name from the output folder's name: other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", folder_name).lstrip("_.-") or "model"


def _build(checkpoint: LoadedCheckpoint, folder: Path, config: ExportConfig, *, pooling: str, normalize: bool,
           sentence_transformer: SentenceTransformerSpec | None, triton_model: str, scratch: Path
           ) -> dict[str, Any]:
    model_config = checkpoint.config
    tokenizer = checkpoint.tokenizer
    fast_tokenizer, tokenizer_origin = build_tokenizer(checkpoint.path, tokenizer, config.tokenizer)
    embedding_rows = int(model_config.vocab_size)
    vocab = fast_tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > embedding_rows:
        raise CheckpointError(
            f"the tokenizer has {vocab} tokens but the model's embedding table has {embedding_rows} rows; the "
            "tokenizer does not belong to this checkpoint."
        )
    max_length = _max_length(checkpoint, config, sentence_transformer)
    graph: EmbeddingGraph | ClassifierGraph
    if checkpoint.task == TASK_EMBEDDING:
        graph = EmbeddingGraph(checkpoint.model, pooling=pooling, normalize=normalize,
                               token_embeddings=config.token_embeddings).eval()
    else:
        segments = int(getattr(model_config, "type_vocab_size", 0) or 0) > 0
        graph = ClassifierGraph(checkpoint.model, checkpoint.task, token_type_ids=segments).eval()

    _say(config, f"exporting {checkpoint.source['architecture']} ({checkpoint.source['parameters'] / 1e6:.0f}M "
                 f"parameters{', RANDOM weights' if checkpoint.source['random_weights'] else ''}) to ONNX")
    model_path = folder / MODEL_FILE
    with folded_relative_attention(checkpoint.model) if config.optimize else nullcontext(0) as folded:
        export_onnx(graph, model_path, opset=config.opset)
    optimization: dict[str, Any] = {"enabled": config.optimize, "relative_attention_layers_folded": folded}
    if config.optimize:
        _say(config, "applying ONNX Runtime's transformer fusions")
        optimization["fused_operators"] = apply_ort_fusions(
            model_path, num_heads=int(model_config.num_attention_heads), hidden_size=int(model_config.hidden_size),
            external_data=(folder / f"{MODEL_FILE}.data").exists())
    fast_tokenizer.save(str(folder / TOKENIZER_FILE))

    report = None
    if config.validate:
        report = validate(graph, model_path, vocab=min(vocab, embedding_rows), max_length=max_length,
                          inputs=graph.inputs, outputs=graph.outputs, shapes=config.validation_shapes,
                          atol=config.atol, seed=config.seed, progress=not config.quiet)
        _say(config, format_report(report))

    hidden = int(model_config.hidden_size)
    classifier = checkpoint.task != TASK_EMBEDDING
    sizes = {"hidden": hidden, "labels": int(model_config.num_labels)} if classifier else {"hidden": hidden}
    model_files = sorted(p.name for p in folder.iterdir() if p.name.startswith(MODEL_FILE))
    inputs = list(graph.inputs)
    outputs = [spec.resolved(**sizes) for spec in graph.outputs]
    head = _classifier_fields(checkpoint) if classifier else {}
    triton = None
    if config.triton:
        triton = write_triton_repository(folder, name=triton_model, model_files=model_files, inputs=inputs,
                                         outputs=outputs, labels=head.get("labels", []),
                                         max_batch_size=config.triton_max_batch_size,
                                         max_queue_delay_us=config.triton_max_queue_delay_us)
        _say(config, f"Triton model repository: {triton['repository']}/{triton_model}/")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model_config.pad_token_id or 0)
    fp32_quality, derived = derive_variants(graph, folder, config, scratch, max_length=max_length, pad_id=int(pad_id),
                                            say=lambda message: _say(config, message))
    manifest = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": checkpoint.source,
        "model": {
            "hidden_size": hidden,
            "max_sequence_length": max_length,
            "vocab_size": embedding_rows,
            "pad_token_id": int(pad_id),
            "num_hidden_layers": int(model_config.num_hidden_layers),
            "task": checkpoint.task,
            "pooling": None if classifier else pooling,
            "normalize": False if classifier else normalize,
            **head,
            "tokenizer_source": tokenizer_origin,
        },
        "graph": {
            "opset": config.opset,
            "inputs": [spec.to_dict() for spec in inputs],
            "outputs": [spec.to_dict() for spec in outputs],
        },
        "optimization": optimization,
        "default_variant": "fp32",
        "variants": {
            "fp32": {
                "file": MODEL_FILE,
                "extra_files": [name for name in model_files if name != MODEL_FILE],
                "precision": "fp32",
                "validation": report,
                "quality": fp32_quality,
            },
            **derived,
        },
        "files": {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in sorted(folder.rglob("*")) if p.is_file()},
        "versions": _versions(),
        **({"triton": triton} if triton else {}),
    }
    write_manifest(folder, manifest)
    return manifest


def _max_length(checkpoint: LoadedCheckpoint, config: ExportConfig,
                sentence_transformer: SentenceTransformerSpec | None = None) -> int:
    limit = int(getattr(checkpoint.config, "max_position_embeddings", 512))
    if config.max_length is not None:
        if config.max_length > limit:
            raise ExportError(f"max_length {config.max_length} exceeds the model's max_position_embeddings ({limit})")
        return config.max_length
    if sentence_transformer is not None and sentence_transformer.max_seq_length is not None:
        return min(sentence_transformer.max_seq_length, limit)
    declared = getattr(checkpoint.tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    return min(int(declared), limit) if declared and declared < 1_000_000 else limit


_VERSIONED = ("deberta-onnx", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")


def _versions(names: tuple[str, ...] = _VERSIONED) -> dict[str, str]:
    """Python's version and each installed package's (missing ones left out)."""
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _say(config: ExportConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is a file; choose a folder path for OUT_DIR.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{target} exists and is not empty; choose another OUT_DIR or pass --overwrite (overwrite=True) to "
            "replace it once the new export is complete."
        )


@contextmanager
def _staging(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh folder beside ``target``; on success swaps it into place, on any failure removes it."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(parent, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL}{os.getpid()}-", dir=parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the finished folder gets the usual permissions
    except OSError as exc:
        raise _write_error(exc, parent, target) from exc
    try:
        yield staging
        _check_target(target, overwrite)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, ExportError):
            raise _write_error(exc, staging, target) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_partials(parent: Path, name: str) -> None:
    """Deletes staging folders left by exports that were killed (their process no longer runs)."""
    for path in parent.glob(f".{name}{_PARTIAL}*"):
        pid_text = path.name[len(f".{name}{_PARTIAL}"):].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_error(exc: OSError, where: Path, target: Path) -> ExportError:
    path = exc.filename or where
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
               errno.EDQUOT: "disk quota exceeded", errno.EPERM: "operation not permitted"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return ExportError(f"cannot write {path}: {reason}. Nothing was written to {target}; free space or fix "
                       "permissions, then export again.")
