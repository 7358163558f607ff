"""Reading, writing and checking ``manifest.json``, the record of what a model folder holds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, TASK_EMBEDDING, TensorSpec
from .errors import ChecksumMismatchError, ManifestError, ModelFolderError

__all__ = ["Manifest", "load_manifest", "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A parsed, version-checked ``manifest.json``. ``data`` is the whole document."""

    folder: Path
    data: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def hidden_size(self) -> int:
        return int(self.model["hidden_size"])

    @property
    def max_sequence_length(self) -> int:
        return int(self.model["max_sequence_length"])

    @property
    def pooling(self) -> str | None:
        """The fused pooling (``mean``, ``cls``, ``max``); ``None`` for classifiers, whose head pools."""
        pooling = self.model.get("pooling")
        return None if pooling is None else str(pooling)

    @property
    def normalize(self) -> bool:
        """Whether the graph L2-normalises its sentence vectors itself."""
        return bool(self.model.get("normalize", False))

    @property
    def task(self) -> str:
        """``embedding``, ``sequence-classification`` or ``token-classification`` (folders older than the
        field hold embedding models)."""
        return str(self.model.get("task", TASK_EMBEDDING))

    @property
    def labels(self) -> tuple[str, ...]:
        """A classifier's label names, in logit order; empty for embedding models."""
        return tuple(str(label) for label in self.model.get("labels", ()))

    def has_output(self, name: str) -> bool:
        """Whether the graph declares an output called ``name``."""
        return any(spec.name == name for spec in self.outputs)

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """Precision name -> entry (``file``, ``validation``, ...), e.g. ``{"fp32": {...}}``."""
        return self.data["variants"]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_dict(d) for d in self.data["graph"]["inputs"])

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_dict(d) for d in self.data["graph"]["outputs"])

    def verify_files(self, names: Iterable[str]) -> None:
        """Checks that each named file exists and has the sha256 the manifest records.

        Raises:
            ModelFolderError: a file is missing or not listed in the manifest.
            ChecksumMismatchError: a file's content differs from what was exported.
        """
        files = self.data["files"]
        for name in names:
            path = self.folder / name
            if name not in files:
                raise ManifestError(
                    f"{self.folder / MANIFEST_FILE} lists no checksum for {name!r}; re-export the model folder "
                    "with `deberta-onnx export`."
                )
            if not path.is_file():
                raise ModelFolderError(f"{path} is missing; the manifest says the folder holds it. Re-export the model.")
            actual = sha256_file(path)
            expected = files[name]["sha256"]
            if actual != expected:
                raise ChecksumMismatchError(
                    f"{path} is corrupted or was replaced: sha256 {actual[:16]}... but the manifest records "
                    f"{expected[:16]}.... Re-export the model, or copy the folder again."
                )


def load_manifest(folder: str | Path) -> Manifest:
    """Reads and checks ``folder/manifest.json``.

    Raises:
        ModelFolderError: the folder does not exist.
        ManifestError: the manifest is missing, not JSON, of another format, or of an unknown version.
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} cannot be read as JSON ({exc}); re-export the model folder.") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a deberta-onnx manifest (no \"format\": \"{MANIFEST_FORMAT}\").")
    version = data.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has manifest_version {version!r}; this runtime reads version {MANIFEST_VERSION}. "
            "Install the deberta-onnx release that wrote it, or re-export with this one."
        )
    missing = [key for key in ("model", "graph", "variants", "files") if key not in data]
    if missing:
        raise ManifestError(f"{path} lacks the section(s) {missing}; re-export the model folder.")
    return Manifest(folder=folder, data=data)


def write_manifest(folder: str | Path, data: dict[str, Any]) -> Path:
    """Writes ``folder/manifest.json`` (sorted keys, UTF-8). Used by the export stage."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
