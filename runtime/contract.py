"""The graph contract: the one place that names the graph's inputs, outputs, dtypes and dynamic axes.

The export stage writes this contract into ``manifest.json``; the runtime checks every loaded session
against it. No other module hard-codes a tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ATTENTION_MASK",
    "INPUT_IDS",
    "INPUTS",
    "LOGITS",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MODEL_FILE",
    "OPSET",
    "OPTIONAL_INPUTS",
    "POOLINGS",
    "REQUIRED_OUTPUT",
    "SENTENCE_EMBEDDING",
    "SENTENCE_OUTPUT",
    "SEQUENCE_LOGITS_OUTPUT",
    "TASKS",
    "TASK_EMBEDDING",
    "TASK_SEQUENCE_CLASSIFICATION",
    "TASK_TOKEN_CLASSIFICATION",
    "TOKENIZER_FILE",
    "TOKEN_EMBEDDINGS",
    "TOKEN_LOGITS_OUTPUT",
    "TOKEN_OUTPUT",
    "TOKEN_TYPE_IDS",
    "TOKEN_TYPE_INPUT",
    "TensorSpec",
    "graph_inputs",
    "graph_outputs",
]

MANIFEST_FORMAT = "deberta-onnx"
MANIFEST_VERSION = 1
OPSET = 18

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
SENTENCE_EMBEDDING = "sentence_embedding"
TOKEN_TYPE_IDS = "token_type_ids"
TOKEN_EMBEDDINGS = "token_embeddings"
LOGITS = "logits"

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
HIDDEN_AXIS = "hidden"
LABELS_AXIS = "labels"

# What a model folder holds, recorded as ``model.task`` in the manifest (absent in older folders: embedding).
TASK_EMBEDDING = "embedding"
TASK_SEQUENCE_CLASSIFICATION = "sequence-classification"
TASK_TOKEN_CLASSIFICATION = "token-classification"
TASKS = (TASK_EMBEDDING, TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION)

# How an embedding graph turns token vectors into one sentence vector (``model.pooling``): masked mean,
# the first ([CLS]) token's vector, or the masked per-dimension maximum.
POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One named tensor of the graph: its ONNX element type and its dimensions.

    A dimension is either a symbolic axis name (dynamic) or an ``int`` (fixed). ``"hidden"`` is fixed per
    model and is resolved to the model's hidden size when the manifest is written.
    """

    name: str
    dtype: str
    dims: tuple[str | int, ...]

    def resolved(self, **sizes: int) -> TensorSpec:
        """Returns a copy with named axes replaced by the given fixed sizes (e.g. ``hidden=768``)."""
        return TensorSpec(name=self.name, dtype=self.dtype, dims=tuple(sizes.get(str(d), d) for d in self.dims))

    def dynamic_axes(self) -> dict[int, str]:
        """The dynamic axes as ``{position: name}``, the form exporters take."""
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), dims=tuple(data["dims"]))


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(name=INPUT_IDS, dtype="int64", dims=(BATCH_AXIS, SEQUENCE_AXIS)),
    TensorSpec(name=ATTENTION_MASK, dtype="int64", dims=(BATCH_AXIS, SEQUENCE_AXIS)),
)

# Only for checkpoints whose config has type_vocab_size > 0 (DeBERTa-v3 has 0): segment ids of text pairs.
TOKEN_TYPE_INPUT = TensorSpec(name=TOKEN_TYPE_IDS, dtype="int64", dims=(BATCH_AXIS, SEQUENCE_AXIS))
OPTIONAL_INPUTS: tuple[TensorSpec, ...] = (TOKEN_TYPE_INPUT,)

SENTENCE_OUTPUT = TensorSpec(name=SENTENCE_EMBEDDING, dtype="float32", dims=(BATCH_AXIS, HIDDEN_AXIS))
# Optional second output of an embedding graph: the encoder's last hidden state, padding included.
TOKEN_OUTPUT = TensorSpec(name=TOKEN_EMBEDDINGS, dtype="float32", dims=(BATCH_AXIS, SEQUENCE_AXIS, HIDDEN_AXIS))
SEQUENCE_LOGITS_OUTPUT = TensorSpec(name=LOGITS, dtype="float32", dims=(BATCH_AXIS, LABELS_AXIS))
TOKEN_LOGITS_OUTPUT = TensorSpec(name=LOGITS, dtype="float32", dims=(BATCH_AXIS, SEQUENCE_AXIS, LABELS_AXIS))

# The output each task's graph must have.
REQUIRED_OUTPUT = {
    TASK_EMBEDDING: SENTENCE_EMBEDDING,
    TASK_SEQUENCE_CLASSIFICATION: LOGITS,
    TASK_TOKEN_CLASSIFICATION: LOGITS,
}


def graph_inputs(*, token_type_ids: bool = False) -> tuple[TensorSpec, ...]:
    """The graph's inputs in order: ``input_ids``, ``attention_mask`` and, if asked, ``token_type_ids``."""
    return INPUTS + ((TOKEN_TYPE_INPUT,) if token_type_ids else ())


def graph_outputs(task: str, *, token_embeddings: bool = False) -> tuple[TensorSpec, ...]:
    """The graph's outputs in order for ``task`` (one of ``TASKS``), before ``hidden``/``labels`` are resolved.

    Raises:
        ValueError: unknown task, or token embeddings asked for a classification task.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == TASK_EMBEDDING:
        return (SENTENCE_OUTPUT, TOKEN_OUTPUT) if token_embeddings else (SENTENCE_OUTPUT,)
    if token_embeddings:
        raise ValueError(f"token embeddings are an output of embedding graphs only, not of {task}")
    return (SEQUENCE_LOGITS_OUTPUT,) if task == TASK_SEQUENCE_CLASSIFICATION else (TOKEN_LOGITS_OUTPUT,)

# ONNX Runtime reports tensor types as strings like "tensor(int64)"; the manifest uses numpy-style names.
ORT_TYPES = {"int64": "tensor(int64)", "int32": "tensor(int32)", "float32": "tensor(float)", "float16": "tensor(float16)"}
