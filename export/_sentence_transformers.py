"""Reading a sentence-transformers checkpoint: the folder that ``SentenceTransformer.save`` and
``SentenceTransformerTrainer`` write (``modules.json``; a Transformer, a Pooling and optionally a Normalize
module), so that the export fuses the same pooling and normalisation and keeps the same maximum length.

Both layouts are read: the current one (``pooling_mode`` in the Pooling config, the Transformer at the folder's
root, its maximum length in ``tokenizer_config.json``) and the older one (``pooling_mode_*_tokens`` flags,
``max_seq_length`` in ``sentence_bert_config.json``, the Transformer possibly in a subfolder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.contract import POOLINGS

from ._errors import CheckpointError, UnsupportedModelError

__all__ = ["MODULES_FILE", "SentenceTransformerSpec", "read_sentence_transformer"]

MODULES_FILE = "modules.json"
_TRANSFORMER_CONFIG = "sentence_bert_config.json"
# The older Pooling config: one boolean per mode, in the order sentence-transformers concatenates them.
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceTransformerSpec:
    """What the export takes from a sentence-transformers checkpoint.

    Attributes:
        transformer_path: the Hugging Face checkpoint inside it (the folder itself, or a subfolder).
        pooling: one of ``POOLINGS``.
        normalize: whether a Normalize module follows the pooling.
        max_seq_length: the Transformer module's maximum length, where its config states one.
        modules: the module class names in order, for the manifest.
    """

    transformer_path: str
    pooling: str
    normalize: bool
    max_seq_length: int | None
    modules: list[str] = field(default_factory=list)

    def to_manifest(self) -> dict[str, Any]:
        return {"modules": self.modules, "pooling": self.pooling, "normalize": self.normalize,
                "max_seq_length": self.max_seq_length}


def _find(src: str, name: str) -> Path | None:
    """``src/name`` in a local folder or the Hugging Face cache (never downloads), or ``None``."""
    local = Path(src) / name
    if Path(src).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(src, name, local_files_only=True, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def _read_json(path: Path, kind: type = dict) -> Any:
    """The JSON document at ``path``, which must be a ``kind`` (an object by default)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); the sentence-transformers folder is "
                              "damaged.") from exc
    if not isinstance(data, kind):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not a {kind.__name__}.")
    return data


def _pooling_mode(config: dict[str, Any], path: Path) -> str:
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_FLAGS.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise UnsupportedModelError(
            f"{path} asks for pooling {' + '.join(modes)}; deberta-onnx fuses exactly one of {', '.join(POOLINGS)} "
            "into the graph. Export the Transformer module's folder with --pooling instead, and pool yourself."
        )
    if config.get("include_prompt", True) is False:
        raise UnsupportedModelError(
            f"{path} excludes prompt tokens from pooling (include_prompt: false), which the fused pooling "
            "cannot do: the graph does not know where a prompt ends."
        )
    return modes[0]


def read_sentence_transformer(src: str) -> SentenceTransformerSpec | None:
    """Reads ``src``'s ``modules.json`` and module configs; ``None`` if ``src`` is not a sentence-transformers
    checkpoint.

    Raises:
        UnsupportedModelError: a module other than Transformer, Pooling and Normalize (e.g. Dense), a pooling
            mode the graph cannot fuse, or modules in an order other than Transformer, Pooling[, Normalize].
        CheckpointError: a module's files are missing or unreadable.
    """
    modules_path = _find(src, MODULES_FILE)
    if modules_path is None:
        return None
    root = modules_path.parent
    entries = _read_json(modules_path, list)
    if not all(isinstance(e, dict) and "type" in e for e in entries):
        raise CheckpointError(f"{modules_path} is not a list of modules with a \"type\" each.")
    entries = sorted(entries, key=lambda e: int(e.get("idx", 0)))
    names = [str(e["type"]).rsplit(".", 1)[-1] for e in entries]
    unsupported = [n for n in names if n not in _SUPPORTED_MODULES]
    if unsupported:
        raise UnsupportedModelError(
            f"{src} is a sentence-transformers model with module(s) {', '.join(unsupported)}; deberta-onnx "
            f"exports {' -> '.join(_SUPPORTED_MODULES)} (Normalize optional). Export the Transformer module's "
            "folder alone and apply the rest yourself."
        )
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UnsupportedModelError(
            f"{src} has modules {' -> '.join(names)}; deberta-onnx exports Transformer -> Pooling, optionally "
            "followed by Normalize."
        )
    transformer_dir = root / str(entries[0].get("path", ""))
    pooling_dir = root / str(entries[1].get("path", ""))
    pooling_config = pooling_dir / "config.json"
    if not pooling_config.is_file():
        raise CheckpointError(f"{pooling_config} is missing; the sentence-transformers folder is incomplete.")
    pooling = _pooling_mode(_read_json(pooling_config), pooling_config)
    normalize = len(entries) == 3
    if normalize:
        normalize_config = root / str(entries[2].get("path", "")) / "config.json"
        target = _read_json(normalize_config).get("module_input_name") if normalize_config.is_file() else None
        if target not in (None, "sentence_embedding"):
            raise UnsupportedModelError(
                f"{normalize_config} normalises {target}, not the sentence embedding; deberta-onnx cannot fuse that."
            )
    max_seq_length = None
    transformer_config = transformer_dir / _TRANSFORMER_CONFIG
    if transformer_config.is_file():
        settings = _read_json(transformer_config)
        if settings.get("do_lower_case"):
            raise UnsupportedModelError(
                f"{transformer_config} lower-cases texts before tokenization (do_lower_case: true), which "
                "tokenizer.json would not do; lower-case your texts and export the Transformer folder alone."
            )
        if settings.get("max_seq_length") is not None:
            max_seq_length = int(settings["max_seq_length"])
    path = str(transformer_dir) if entries[0].get("path") or Path(src).is_dir() else src
    return SentenceTransformerSpec(transformer_path=path, pooling=pooling, normalize=normalize,
                                   max_seq_length=max_seq_length, modules=names)
