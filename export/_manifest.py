"""The model folder's ``manifest.json``: what the export wrote, assembled and written in one place through the
runtime's manifest API (which reads it back)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.contract import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MODEL_FILE,
    TASK_EMBEDDING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
    TensorSpec,
)
from deberta_onnx.runtime.installed import installed_versions
from deberta_onnx.runtime.manifest import sha256_file, write_manifest

from ._checkpoint import LoadedCheckpoint

__all__ = ["VERSIONED", "model_fields", "write_export_manifest"]

# The distributions whose versions the manifest records.
VERSIONED = ("deberta-onnx", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")
# sentence-transformers CrossEncoder activations (saved as a torch class path) the runtime applies.
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


def model_fields(checkpoint: LoadedCheckpoint, *, max_length: int, pad_id: int, pooling: str, normalize: bool,
                 tokenizer_source: str) -> dict[str, Any]:
    """The manifest's ``model`` section: sizes, task, pooling, a classifier's labels, the tokenizer's origin."""
    config = checkpoint.config
    head = checkpoint.task != TASK_EMBEDDING
    # Labels belong to the classifiers: question answering scores token positions, multiple choice the choices
    # given and fill-mask the vocabulary.
    classifier = checkpoint.task in (TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION)
    return {
        "hidden_size": int(config.hidden_size),
        "max_sequence_length": max_length,
        "vocab_size": int(config.vocab_size),
        "pad_token_id": pad_id,
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": int(config.num_attention_heads),
        "task": checkpoint.task,
        "pooling": None if head else pooling,
        "normalize": False if head else normalize,
        **(_classifier_fields(checkpoint) if classifier else {}),
        "tokenizer_source": tokenizer_source,
    }


def _classifier_fields(checkpoint: LoadedCheckpoint) -> dict[str, Any]:
    """The ``model`` entries of a classifier: labels in logit order, problem type, and a cross-encoder's score
    activation as sentence-transformers saved it."""
    config: Any = checkpoint.config  # transformers types id2label as keyed by int or str, num_labels as optional
    labels = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(int(config.num_labels))]
    fields: dict[str, Any] = {"labels": labels, "problem_type": getattr(config, "problem_type", None)}
    if checkpoint.task == TASK_SEQUENCE_CLASSIFICATION:
        saved = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") or getattr(
            config, "sbert_ce_default_activation_function", None)
        fields["score_activation"] = _ACTIVATIONS.get(str(saved).rsplit(".", 1)[-1]) if saved else None
    return fields


def write_export_manifest(
    folder: Path,
    *,
    source: dict[str, Any],
    model: dict[str, Any],
    opset: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    optimization: dict[str, Any],
    model_files: Sequence[str],
    validation: dict[str, Any] | None,
    fp32_quality: dict[str, Any] | None,
    variants: dict[str, dict[str, Any]],
    triton: dict[str, Any] | None,
    hub: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``folder/manifest.json`` once every other file is in place, and returns it.

    Args:
        folder: the finished model folder: every file in it gets its sha256 and size in ``files``.
        source: where the checkpoint came from (``LoadedCheckpoint.source``).
        model: the ``model`` section (``model_fields``).
        opset: the graph's ONNX opset.
        inputs, outputs: the graph's tensor specs, fixed sizes resolved.
        optimization: what the graph speed-ups did.
        model_files: the fp32 graph's files (``model.onnx`` and any external data).
        validation: the fp32 graph's validation report, or ``None`` when not validated.
        fp32_quality: the fp32 graph's quality-gate report, or ``None``.
        variants: the lower precisions' entries, by name.
        triton: the Triton repository's entry, or ``None``.
        hub: the Hugging Face layout's entry (``_hub.write_hub_files``), or ``None``.
    """
    manifest = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "model": model,
        "graph": {
            "opset": opset,
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
                "validation": validation,
                "quality": fp32_quality,
            },
            **variants,
        },
        "files": {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in sorted(folder.rglob("*")) if p.is_file()},
        "versions": installed_versions(VERSIONED),
        **({"triton": triton} if triton else {}),
        **({"hub": hub} if hub else {}),
    }
    write_manifest(folder, manifest)
    return manifest
