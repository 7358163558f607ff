"""The Hugging Face layout beside the model folder's own files, so that loaders of that ecosystem (transformers.js,
Optimum) take the folder as it is: ``config.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, and
each variant under the name those loaders look for in ``onnx/``.

The ``onnx/`` files are hard links to the variants (no second copy on disk; a copy only where the file system
refuses links): the runtime reads ``model.onnx`` and ``model.PRECISION.onnx`` as before, the manifest records every
name with the same checksum, and older folders, which have no ``onnx/``, load as they did.

A graph that takes an input those loaders do not build from the tokenizer's output (fill-mask's ``mask_positions``)
gets no ``onnx/``: they would call it without that input, and read its ``[batch, masks, vocab]`` logits as the
``[batch, sequence, vocab]`` of every token. The manifest's ``hub.onnx_left_out`` says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.contract import (
    ATTENTION_MASK,
    HUB_FILES,
    HUB_ONNX_DIR,
    INPUT_IDS,
    TOKEN_TYPE_IDS,
    TOKENIZER_FILE,
)

from ._checkpoint import LoadedCheckpoint
from ._triton import link_or_copy

__all__ = ["write_hub_files"]

_CONFIG = "config.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_SPECIAL_TOKENS = "special_tokens_map.json"
# transformers.js picks its tokenizer by this name; transformers 5 saves its generic backend's name instead.
_TOKENIZER_CLASSES = {"deberta-v2": "DebertaV2Tokenizer", "deberta": "DebertaTokenizer"}
# Settings of the exporting machine's session, not of the tokenizer.
_LOCAL_SETTINGS = ("name_or_path", "vocab_file", "tokenizer_file", "is_local", "local_files_only", "backend")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The inputs a Hugging Face loader feeds a graph: what the tokenizer gives.
_TOKENIZER_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)


def write_hub_files(folder: Path, checkpoint: LoadedCheckpoint, variants: dict[str, dict[str, Any]], *,
                    inputs: list[str], max_length: int, pad_id: int, scratch: Path) -> dict[str, Any]:
    """Writes the Hugging Face layout into the finished model ``folder`` and returns the manifest's ``hub`` entry.

    Args:
        folder: the model folder, every variant written (``variants``: manifest entries by precision, fp32 too).
        checkpoint: the source checkpoint: its config and tokenizer settings are written out.
        inputs: the graph's input names: those a tokenizer gives are its ``model_input_names``; any other leaves
            ``onnx/`` out.
        max_length: the longest input, written as the tokenizer's ``model_max_length``.
        pad_id: the padding id the graph was validated with; its token is the tokenizer's ``pad_token``.
        scratch: a folder for the tokenizer's own files (only its settings are kept).
    """
    config = {key: value for key, value in checkpoint.config.to_dict().items() if key != "_name_or_path"}
    _write_json(folder / _CONFIG, config)
    tokenized = [name for name in inputs if name in _TOKENIZER_INPUTS]
    pad_token = _tokenizer_files(folder, checkpoint, inputs=tokenized, max_length=max_length, pad_id=pad_id,
                                 scratch=scratch)
    layout: dict[str, Any] = {"config": _CONFIG, "tokenizer_config": _TOKENIZER_CONFIG,
                              "special_tokens_map": _SPECIAL_TOKENS, "pad_token": pad_token}
    others = [name for name in inputs if name not in _TOKENIZER_INPUTS]
    if others:
        return {"files": {}, "hard_links": True, **layout, "onnx_left_out": (
            f"the graph also takes {', '.join(others)}, which Hugging Face loaders (transformers.js, Optimum) do not "
            "feed; run the folder with deberta-onnx, or feed that input yourself from model.onnx")}
    onnx_dir = folder / HUB_ONNX_DIR
    onnx_dir.mkdir()
    files: dict[str, str] = {}
    linked = True
    for precision, entry in variants.items():
        name = HUB_FILES[precision]
        for source in (entry["file"], *entry.get("extra_files", ())):
            # External data keeps the name the graph records for it (``model.onnx.data``): it is read by that name.
            target = onnx_dir / (name if source == entry["file"] else source)
            linked &= link_or_copy(folder / source, target)
            files[target.relative_to(folder).as_posix()] = source
    return {"files": files, "hard_links": linked, **layout}


def _tokenizer_files(folder: Path, checkpoint: LoadedCheckpoint, *, inputs: list[str], max_length: int,
                     pad_id: int, scratch: Path) -> str:
    """``tokenizer_config.json`` (the checkpoint tokenizer's settings, with the export's maximum length and
    padding) and ``special_tokens_map.json``; returns the pad token. The vocabulary stays ``tokenizer.json``'s."""
    saved = scratch / "hub-tokenizer"
    checkpoint.tokenizer.save_pretrained(str(saved))
    settings_path = saved / _TOKENIZER_CONFIG
    settings: dict[str, Any] = (json.loads(settings_path.read_text(encoding="utf-8"))
                                if settings_path.is_file() else {})
    vocabulary = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
    pad_token = next((token["content"] for token in vocabulary.get("added_tokens", []) if token["id"] == pad_id),
                     None) or str(checkpoint.tokenizer.convert_ids_to_tokens(pad_id))
    special = {name: str(getattr(checkpoint.tokenizer, name)) for name in _SPECIAL_NAMES
               if getattr(checkpoint.tokenizer, name, None) is not None}
    special["pad_token"] = pad_token
    settings.update(special)
    settings["model_max_length"] = max_length
    settings["model_input_names"] = inputs
    model_type = str(getattr(checkpoint.config, "model_type", ""))
    if model_type in _TOKENIZER_CLASSES and not str(settings.get("tokenizer_class", "")).startswith("Deberta"):
        settings["tokenizer_class"] = _TOKENIZER_CLASSES[model_type]
    for key in _LOCAL_SETTINGS:
        settings.pop(key, None)
    _write_json(folder / _TOKENIZER_CONFIG, settings)
    _write_json(folder / _SPECIAL_TOKENS, special)
    return pad_token


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
