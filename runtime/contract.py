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
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MODEL_FILE",
    "OPSET",
    "PRECISIONS",
    "SENTENCE_EMBEDDING",
    "SENTENCE_OUTPUT",
    "TOKENIZER_FILE",
    "TensorSpec",
    "variant_file",
]

MANIFEST_FORMAT = "deberta-onnx"
MANIFEST_VERSION = 1
OPSET = 18

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"

# Names of the exported variants (keys of manifest["variants"]). fp32 is the reference every other one is
# derived from and compared with.
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
SENTENCE_EMBEDDING = "sentence_embedding"

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
HIDDEN_AXIS = "hidden"


def variant_file(precision: str) -> str:
    """The graph file of a precision: ``model.onnx`` for fp32, ``model.PRECISION.onnx`` for the others."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return MODEL_FILE if precision == "fp32" else f"model.{precision}.onnx"


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

SENTENCE_OUTPUT = TensorSpec(name=SENTENCE_EMBEDDING, dtype="float32", dims=(BATCH_AXIS, HIDDEN_AXIS))

# ONNX Runtime reports tensor types as strings like "tensor(int64)"; the manifest uses numpy-style names.
ORT_TYPES = {"int64": "tensor(int64)", "int32": "tensor(int32)", "float32": "tensor(float)", "float16": "tensor(float16)"}
