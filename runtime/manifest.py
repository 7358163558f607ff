"""``manifest.json``, the record of what a model folder holds: read and checked into typed fields, verified
against the files, and written (by the export) through the same checks.

    manifest = load_manifest("models/deberta-v3-base")
    manifest.model.hidden_size, manifest.variants["int8-static"].file, manifest.source.random_weights
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._manifest_fields import Reader, file_fields, model_fields, source_fields, tensor_specs, variant_fields
from .contract import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, TensorSpec
from .errors import ChecksumMismatchError, ManifestError, ModelFolderError
from .files import atomic_write

__all__ = [
    "FileEntry",
    "Manifest",
    "ModelInfo",
    "Source",
    "Variant",
    "file_entries",
    "load_manifest",
    "sha256_file",
    "write_manifest",
]

_CHUNK = 1 << 20
_SECTIONS = ("model", "graph", "variants", "files")


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` for every file under ``folder``, the manifest's ``files`` section."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The manifest's ``model`` section: what the graph computes and how to feed it."""

    hidden_size: int
    max_sequence_length: int
    vocab_size: int
    pad_token_id: int
    num_hidden_layers: int | None
    num_attention_heads: int | None  # recorded by exports since the memory guard; older folders: None
    task: str
    pooling: str | None  # embedding graphs: mean, cls or max; None for classifiers, whose head pools
    normalize: bool  # the graph L2-normalises its sentence vectors itself
    labels: tuple[str, ...]  # classifiers: label names in logit order
    problem_type: str | None  # classifiers: transformers' problem_type
    score_activation: str | None  # cross-encoders: sigmoid, tanh or identity, as sentence-transformers saved it
    tokenizer_source: str | None
    mask_token: str | None = None  # fill-mask: the token whose positions the graph scores (``[MASK]``)


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where the graph came from (the manifest's ``source`` section)."""

    model: str
    model_type: str | None
    architecture: str | None
    random_weights: bool
    shape: str | None
    parameters: int | None
    sentence_transformers: dict[str, Any] | None
    outliers: dict[str, Any] | None = None  # random checkpoints built with activation outliers: how


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One exported precision (an entry of the manifest's ``variants``). The reports stay plain dicts: they are
    read by people and by ``deberta-onnx info``, not by the runtime."""

    name: str
    file: str
    extra_files: tuple[str, ...]
    recipe: str | None
    recipe_description: str | None
    validation: dict[str, Any] | None  # fp32: the comparison with PyTorch over the shape grid
    quality: dict[str, Any] | None  # the quality gate's report
    nodes: dict[str, Any] | None  # which MatMuls run in which precision
    calibration: dict[str, Any] | None  # the calibration texts (int8-static: they fixed the activation scales)
    range_audit: dict[str, Any] | None = None  # fp16: what stays fp32 near fp16's range, and why

    @property
    def files(self) -> tuple[str, ...]:
        """The graph file and its external-data files."""
        return (self.file, *self.extra_files)


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """A file's recorded sha256 and size."""

    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A parsed, version- and type-checked ``manifest.json``."""

    folder: Path
    model: ModelInfo
    source: Source
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int | None
    variants: dict[str, Variant]
    default_variant: str
    files: dict[str, FileEntry]
    optimization: dict[str, Any]
    versions: dict[str, str]
    created_at: str | None
    triton: dict[str, Any] | None
    document: Mapping[str, Any]

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_FILE

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def max_sequence_length(self) -> int:
        return self.model.max_sequence_length

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def pooling(self) -> str | None:
        return self.model.pooling

    @property
    def normalize(self) -> bool:
        return self.model.normalize

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    def has_output(self, name: str) -> bool:
        """Whether the graph declares an output called ``name``."""
        return any(spec.name == name for spec in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """The whole document as read (a copy)."""
        return copy.deepcopy(dict(self.document))

    def verify_files(self, names: Iterable[str]) -> None:
        """Checks that each named file exists and has the sha256 the manifest records.

        Raises:
            ManifestError: a file is not listed in the manifest.
            ModelFolderError: a file is missing.
            ChecksumMismatchError: a file's content differs from what was exported.
        """
        for name in names:
            path = self.folder / name
            entry = self.files.get(name)
            if entry is None:
                raise ManifestError(
                    f"{self.path} lists no checksum for {name!r}; re-export the model folder with "
                    "`deberta-onnx export`."
                )
            if not path.is_file():
                raise ModelFolderError(f"{path} is missing; the manifest says the folder holds it. Re-export the "
                                       "model.")
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise ChecksumMismatchError(
                    f"{path} is corrupted or was replaced: sha256 {actual[:16]}... but the manifest records "
                    f"{entry.sha256[:16]}.... Re-export the model, or copy the folder again."
                )


def _parse(folder: Path, data: object, path: Path) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a deberta-onnx manifest (no \"format\": \"{MANIFEST_FORMAT}\").")
    version = data.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has manifest_version {version!r}; this runtime reads version {MANIFEST_VERSION}. "
            "Install the deberta-onnx release that wrote it, or re-export with this one."
        )
    missing = [key for key in _SECTIONS if key not in data]
    if missing:
        raise ManifestError(f"{path} lacks the section(s) {missing}; re-export the model folder.")
    reader = Reader(path)
    graph = reader.section(data, "graph", "graph")
    variants = {name: Variant(**fields) for name, fields in variant_fields(reader, data).items()}
    default = reader.text(data, "default_variant", "default_variant", optional=True) or "fp32"
    if default not in variants:
        raise reader.fail("default_variant", f"is {default!r}, which is not among the variants {sorted(variants)}")
    versions = reader.section(data, "versions", "versions", optional=True)
    return Manifest(
        folder=folder,
        model=ModelInfo(**model_fields(reader, data)),
        source=Source(**source_fields(reader, data)),
        inputs=tensor_specs(reader, graph, "inputs"),
        outputs=tensor_specs(reader, graph, "outputs"),
        opset=reader.maybe_integer(graph, "opset", "graph.opset"),
        variants=variants,
        default_variant=default,
        files={name: FileEntry(**entry) for name, entry in file_fields(reader, data).items()},
        optimization=reader.section(data, "optimization", "optimization", optional=True),
        versions={str(k): str(v) for k, v in versions.items()},
        created_at=reader.text(data, "created_at", "created_at", optional=True),
        triton=reader.report(data, "triton", "triton"),
        document=data,
    )


def load_manifest(folder: str | Path) -> Manifest:
    """Reads and checks ``folder/manifest.json``: format, version, and every field's type and range.

    Raises:
        ModelFolderError: the folder does not exist.
        ManifestError: the manifest is missing, not JSON, of another format or version, or a field is missing,
            mistyped, out of range, or names a file outside the folder (the message names the field).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {str(folder)!r} does not exist or is not a folder; pass the OUT_DIR that "
            "`deberta-onnx export` wrote."
        )
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: {folder} is not a folder written by `deberta-onnx export`. Export the "
            "checkpoint first: `deberta-onnx export SRC OUT_DIR`."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ManifestError(f"{path} cannot be read as JSON ({exc}); re-export the model folder.") from exc
    return _parse(folder, data, path)


def write_manifest(folder: str | Path, data: dict[str, Any]) -> Path:
    """Checks ``data`` as ``load_manifest`` would, then writes ``folder/manifest.json`` atomically (sorted keys,
    UTF-8). The export writes every manifest through here, so it cannot write one the runtime refuses.

    Raises:
        ManifestError: ``data`` is not a manifest this runtime would load.
    """
    path = Path(folder) / MANIFEST_FILE
    _parse(Path(folder), data, path)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), durable=True)
