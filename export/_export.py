"""``export_model``: checkpoint -> validated model folder (``model.onnx``, ``tokenizer.json``, ``manifest.json``)."""

from __future__ import annotations

import errno
import os
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
    INPUTS,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MODEL_FILE,
    OPSET,
    SENTENCE_OUTPUT,
    TOKENIZER_FILE,
)
from deberta_onnx.runtime.manifest import sha256_file, write_manifest

from ._checkpoint import (
    RANDOM_PREFIX,
    LoadedCheckpoint,
    load_checkpoint,
    quiet_libraries,
    random_source,
    scratch_dir,
)
from ._errors import CheckpointError, ExportError, OutputExistsError
from ._graph import POOLINGS, EmbeddingGraph, export_onnx
from ._optimize import apply_ort_fusions, folded_relative_attention
from ._tokenizer import TOKENIZER_SOURCES, build_tokenizer
from ._validate import DEFAULT_VALIDATION_SHAPES, format_report, validate

__all__ = ["ExportConfig", "ExportResult", "export_model"]

_PARTIAL = ".partial-"


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Options of ``export_model``; ``deberta-onnx export`` flags map one-to-one onto these fields.

    Attributes:
        overwrite: replace a non-empty OUT_DIR (the old folder is swapped out only once the new one is complete).
        pooling: how token vectors become one sentence vector, fused in the graph: ``"mean"`` (masked mean).
        max_length: longest input in tokens; default the tokenizer's ``model_max_length`` capped at the
            model's ``max_position_embeddings``.
        validate: compare ONNX Runtime with PyTorch after export (strongly recommended).
        validation_shapes: (batch, sequence) pairs to validate on.
        atol: largest allowed max |diff| between ONNX Runtime and PyTorch.
        tokenizer: where ``tokenizer.json`` comes from: ``"sentencepiece"`` (the checkpoint's ``spm.model``, ids
            identical to SentencePiece's; the default) or ``"transformers"`` (the installed transformers' fast
            tokenizer, for byte-exact agreement with an existing transformers pipeline).
        opset: ONNX opset of the graph.
        optimize: apply DeBERTa-specific graph speed-ups (see ``export/_optimize.py``): relative-position
            projections folded into per-layer constants, no per-batch repeat, position bias computed only for
            the distances a sequence can use. Recorded in the manifest; validated like the plain graph.
        seed: seeds the validation inputs.
        quiet: no progress bars or report on stderr.
    """

    overwrite: bool = False
    pooling: str = "mean"
    max_length: int | None = None
    validate: bool = True
    validation_shapes: tuple[tuple[int, int], ...] = DEFAULT_VALIDATION_SHAPES
    atol: float = 1e-4
    tokenizer: str = "sentencepiece"
    opset: int = OPSET
    optimize: bool = True
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
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
        checkpoint = load_checkpoint(source)
        if str(src).startswith(RANDOM_PREFIX):
            checkpoint.source["model"] = str(src)
        with _staging(target, config.overwrite) as staging:
            manifest = _build(checkpoint, staging, config)
    seconds = time.perf_counter() - started
    _say(config, f"exported {src} to {target} in {seconds:.1f} s")
    return ExportResult(out_dir=target, manifest=manifest, seconds=seconds)


def _build(checkpoint: LoadedCheckpoint, folder: Path, config: ExportConfig) -> dict[str, Any]:
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
    max_length = _max_length(checkpoint, config)
    graph = EmbeddingGraph(checkpoint.model, pooling=config.pooling).eval()

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
                          shapes=config.validation_shapes, atol=config.atol, seed=config.seed,
                          progress=not config.quiet)
        _say(config, format_report(report))

    hidden = int(model_config.hidden_size)
    model_files = sorted(p.name for p in folder.iterdir() if p.name.startswith(MODEL_FILE))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model_config.pad_token_id or 0)
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
            "pooling": config.pooling,
            "normalize": False,
            "tokenizer_source": tokenizer_origin,
        },
        "graph": {
            "opset": config.opset,
            "inputs": [spec.to_dict() for spec in INPUTS],
            "outputs": [SENTENCE_OUTPUT.resolved(hidden=hidden).to_dict()],
        },
        "optimization": optimization,
        "default_variant": "fp32",
        "variants": {
            "fp32": {
                "file": MODEL_FILE,
                "extra_files": [name for name in model_files if name != MODEL_FILE],
                "precision": "fp32",
                "validation": report,
            }
        },
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in sorted(folder.iterdir()) if p.is_file()},
        "versions": _versions(),
    }
    write_manifest(folder, manifest)
    return manifest


def _max_length(checkpoint: LoadedCheckpoint, config: ExportConfig) -> int:
    limit = int(getattr(checkpoint.config, "max_position_embeddings", 512))
    if config.max_length is not None:
        if config.max_length > limit:
            raise ExportError(f"max_length {config.max_length} exceeds the model's max_position_embeddings ({limit})")
        return config.max_length
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
        raise _write_error(exc, parent) from exc
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
            raise _write_error(exc, staging) from exc
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


def _write_error(exc: OSError, where: Path) -> ExportError:
    path = exc.filename or where
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
               errno.EDQUOT: "disk quota exceeded", errno.EPERM: "operation not permitted"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return ExportError(f"cannot write {path}: {reason}. Nothing was written to the output folder; free space or "
                       "fix permissions, then export again.")
