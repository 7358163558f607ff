"""The graph contract: the one place that names the graph's inputs, outputs, dtypes and dynamic axes.

The export stage writes this contract into ``manifest.json``; the runtime checks every loaded session
against it. No other module hard-codes a tensor name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import ContractMismatchError

__all__ = [
    "ATTENTION_MASK",
    "BATCH_AXIS",
    "CHOICES_AXIS",
    "CHOICE_LOGITS_OUTPUT",
    "END_LOGITS",
    "HIDDEN_AXIS",
    "HUB_FILES",
    "HUB_ONNX_DIR",
    "INPUTS",
    "INPUT_IDS",
    "LABELS_AXIS",
    "LOGITS",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MASKS_AXIS",
    "MASK_LOGITS_OUTPUT",
    "MASK_POSITIONS",
    "MASK_POSITIONS_INPUT",
    "MODEL_FILE",
    "OPSET",
    "OPTIONAL_INPUTS",
    "ORT_TYPES",
    "POOLINGS",
    "PRECISIONS",
    "QUESTION_ANSWERING_OUTPUTS",
    "REQUIRED_OUTPUT",
    "SENTENCE_EMBEDDING",
    "SENTENCE_OUTPUT",
    "SEQUENCE_AXIS",
    "SEQUENCE_LOGITS_OUTPUT",
    "START_LOGITS",
    "TASKS",
    "TASK_EMBEDDING",
    "TASK_FILL_MASK",
    "TASK_MULTIPLE_CHOICE",
    "TASK_QUESTION_ANSWERING",
    "TASK_SEQUENCE_CLASSIFICATION",
    "TASK_TOKEN_CLASSIFICATION",
    "TOKENIZER_FILE",
    "TOKEN_EMBEDDINGS",
    "TOKEN_LOGITS_OUTPUT",
    "TOKEN_OUTPUT",
    "TOKEN_TYPE_IDS",
    "TOKEN_TYPE_INPUT",
    "VOCAB_AXIS",
    "TensorSpec",
    "check_session",
    "check_sizes",
    "choice_inputs",
    "graph_inputs",
    "graph_outputs",
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

# The Hugging Face layout beside those files (written by exports since the layout was added): each variant also under
# the name transformers.js (its ``dtype``: fp32, fp16, q8, int8) and Optimum look for, in ``onnx/``.
HUB_ONNX_DIR = "onnx"
HUB_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8-dynamic": "model_quantized.onnx",
             "int8-static": "model_int8.onnx"}

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
SENTENCE_EMBEDDING = "sentence_embedding"
TOKEN_TYPE_IDS = "token_type_ids"
TOKEN_EMBEDDINGS = "token_embeddings"
LOGITS = "logits"
# Fill-mask graphs: where each row's [MASK] tokens are (the runtime finds them in the token ids), so that the
# vocabulary projection runs at those positions only and [batch, sequence, vocab] scores never exist.
MASK_POSITIONS = "mask_positions"
# An extractive question-answering graph's outputs: per token, the logit that the answer starts / ends there.
START_LOGITS = "start_logits"
END_LOGITS = "end_logits"

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
HIDDEN_AXIS = "hidden"
LABELS_AXIS = "labels"
CHOICES_AXIS = "choices"  # multiple choice: the answers offered for one question
MASKS_AXIS = "masks"  # fill-mask: the masked positions of a row (padded with position 0 where a row has fewer)
VOCAB_AXIS = "vocab"

# What a model folder holds, recorded as ``model.task`` in the manifest (absent in older folders: embedding).
TASK_EMBEDDING = "embedding"
TASK_SEQUENCE_CLASSIFICATION = "sequence-classification"
TASK_TOKEN_CLASSIFICATION = "token-classification"
TASK_QUESTION_ANSWERING = "question-answering"
TASK_MULTIPLE_CHOICE = "multiple-choice"
TASK_FILL_MASK = "fill-mask"
TASKS = (TASK_EMBEDDING, TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION, TASK_QUESTION_ANSWERING,
         TASK_MULTIPLE_CHOICE, TASK_FILL_MASK)

# How an embedding graph turns token vectors into one sentence vector (``model.pooling``): masked mean,
# the first ([CLS]) token's vector, or the masked per-dimension maximum.
POOLINGS = ("mean", "cls", "max")


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

# Only for checkpoints whose config has type_vocab_size > 0 (DeBERTa-v3 has 0): segment ids of text pairs.
TOKEN_TYPE_INPUT = TensorSpec(name=TOKEN_TYPE_IDS, dtype="int64", dims=(BATCH_AXIS, SEQUENCE_AXIS))
MASK_POSITIONS_INPUT = TensorSpec(name=MASK_POSITIONS, dtype="int64", dims=(BATCH_AXIS, MASKS_AXIS))
OPTIONAL_INPUTS: tuple[TensorSpec, ...] = (TOKEN_TYPE_INPUT, MASK_POSITIONS_INPUT)

SENTENCE_OUTPUT = TensorSpec(name=SENTENCE_EMBEDDING, dtype="float32", dims=(BATCH_AXIS, HIDDEN_AXIS))
# Optional second output of an embedding graph: the encoder's last hidden state, padding included.
TOKEN_OUTPUT = TensorSpec(name=TOKEN_EMBEDDINGS, dtype="float32", dims=(BATCH_AXIS, SEQUENCE_AXIS, HIDDEN_AXIS))
SEQUENCE_LOGITS_OUTPUT = TensorSpec(name=LOGITS, dtype="float32", dims=(BATCH_AXIS, LABELS_AXIS))
TOKEN_LOGITS_OUTPUT = TensorSpec(name=LOGITS, dtype="float32", dims=(BATCH_AXIS, SEQUENCE_AXIS, LABELS_AXIS))
CHOICE_LOGITS_OUTPUT = TensorSpec(name=LOGITS, dtype="float32", dims=(BATCH_AXIS, CHOICES_AXIS))
MASK_LOGITS_OUTPUT = TensorSpec(name=LOGITS, dtype="float32", dims=(BATCH_AXIS, MASKS_AXIS, VOCAB_AXIS))
_LOGITS_OUTPUTS = {
    TASK_SEQUENCE_CLASSIFICATION: SEQUENCE_LOGITS_OUTPUT,
    TASK_TOKEN_CLASSIFICATION: TOKEN_LOGITS_OUTPUT,
    TASK_MULTIPLE_CHOICE: CHOICE_LOGITS_OUTPUT,
    TASK_FILL_MASK: MASK_LOGITS_OUTPUT,
}
QUESTION_ANSWERING_OUTPUTS = (TensorSpec(name=START_LOGITS, dtype="float32", dims=(BATCH_AXIS, SEQUENCE_AXIS)),
                              TensorSpec(name=END_LOGITS, dtype="float32", dims=(BATCH_AXIS, SEQUENCE_AXIS)))

# The output each task's graph must have.
REQUIRED_OUTPUT = {
    TASK_EMBEDDING: SENTENCE_EMBEDDING,
    TASK_SEQUENCE_CLASSIFICATION: LOGITS,
    TASK_TOKEN_CLASSIFICATION: LOGITS,
    TASK_MULTIPLE_CHOICE: LOGITS,
    TASK_FILL_MASK: LOGITS,
    TASK_QUESTION_ANSWERING: START_LOGITS,  # and END_LOGITS: QuestionAnswerer checks both at load
}


def graph_inputs(*, token_type_ids: bool = False) -> tuple[TensorSpec, ...]:
    """The graph's inputs in order: ``input_ids``, ``attention_mask`` and, if asked, ``token_type_ids``."""
    return INPUTS + ((TOKEN_TYPE_INPUT,) if token_type_ids else ())


def choice_inputs(*, token_type_ids: bool = False) -> tuple[TensorSpec, ...]:
    """A multiple-choice graph's inputs: ``graph_inputs``' with a ``choices`` axis after the batch axis (each row
    is one question, each choice one (prompt, answer) pair)."""
    return tuple(TensorSpec(name=spec.name, dtype=spec.dtype, dims=(BATCH_AXIS, CHOICES_AXIS, *spec.dims[1:]))
                 for spec in graph_inputs(token_type_ids=token_type_ids))


def graph_outputs(task: str, *, token_embeddings: bool = False) -> tuple[TensorSpec, ...]:
    """The graph's outputs in order for ``task`` (one of ``TASKS``), before ``hidden``/``labels`` are resolved.

    Raises:
        ValueError: unknown task, or token embeddings asked for a task with a head.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == TASK_EMBEDDING:
        return (SENTENCE_OUTPUT, TOKEN_OUTPUT) if token_embeddings else (SENTENCE_OUTPUT,)
    if token_embeddings:
        raise ValueError(f"token embeddings are an output of embedding graphs only, not of {task}")
    if task == TASK_QUESTION_ANSWERING:
        return QUESTION_ANSWERING_OUTPUTS
    return (_LOGITS_OUTPUTS[task],)


# ONNX Runtime reports tensor types as strings like "tensor(int64)"; the manifest uses numpy-style names.
ORT_TYPES = {
    "int64": "tensor(int64)", "int32": "tensor(int32)", "float32": "tensor(float)", "float16": "tensor(float16)",
}


class _NodeArg(Protocol):
    name: str
    type: str
    shape: Sequence[Any] | None


class _Session(Protocol):
    """What the check reads of an ``onnxruntime.InferenceSession``."""

    def get_inputs(self) -> Sequence[_NodeArg]: ...
    def get_outputs(self) -> Sequence[_NodeArg]: ...


def check_session(
    session: _Session,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    task: str,
    model_path: Path,
    manifest_path: Path,
) -> None:
    """Checks a manifest's declared graph against this contract, and a loaded session against the manifest.

    Args:
        session: the ONNX Runtime session of ``model_path``.
        inputs: the inputs the manifest declares.
        outputs: the outputs the manifest declares.
        task: the manifest's task.
        model_path: the graph file, for messages.
        manifest_path: the manifest, for messages.

    Raises:
        ContractMismatchError: names, dtypes or fixed dimensions disagree; says which and where.
    """
    declared_inputs = {spec.name: spec for spec in inputs}
    for spec in INPUTS:
        if spec.name not in declared_inputs or declared_inputs[spec.name].dtype != spec.dtype:
            raise ContractMismatchError(
                f"{manifest_path} declares inputs {sorted(declared_inputs)} but this runtime "
                f"needs {spec.name} ({spec.dtype}); re-export the model with this deberta-onnx version."
            )
    known = {spec.name: spec for spec in (*INPUTS, *OPTIONAL_INPUTS)}
    for name, spec in declared_inputs.items():
        if name not in known or known[name].dtype != spec.dtype:
            raise ContractMismatchError(
                f"{manifest_path} declares input {name} ({spec.dtype}), which this runtime does "
                f"not know (it feeds {', '.join(sorted(known))}); install the deberta-onnx release that wrote it."
            )
    session_inputs = {node.name: node.type for node in session.get_inputs()}
    for spec in declared_inputs.values():
        if session_inputs.get(spec.name) != ORT_TYPES[spec.dtype]:
            raise ContractMismatchError(
                f"{model_path} does not match its manifest: input {spec.name} should be {ORT_TYPES[spec.dtype]}, "
                f"the graph has {session_inputs.get(spec.name, 'no such input')} (graph inputs: "
                f"{sorted(session_inputs)}). The model file was replaced or the manifest edited; re-export."
            )
    extra = sorted(set(session_inputs) - set(declared_inputs))
    if extra:
        raise ContractMismatchError(
            f"{model_path} has input(s) {extra} that its manifest does not declare; the model file was replaced "
            "or the manifest edited. Re-export the model."
        )
    session_outputs = {node.name: node for node in session.get_outputs()}
    for spec in outputs:
        node = session_outputs.get(spec.name)
        if node is None:
            raise ContractMismatchError(
                f"{model_path} has no output {spec.name!r} though its manifest declares it (graph outputs: "
                f"{sorted(session_outputs)}); re-export the model."
            )
        if node.type != ORT_TYPES.get(spec.dtype):
            raise ContractMismatchError(
                f"{model_path}: output {spec.name} is {node.type}, the manifest declares {spec.dtype}; re-export."
            )
        shape = list(node.shape or [])
        if shape and len(shape) != len(spec.dims):
            raise ContractMismatchError(
                f"{model_path}: output {spec.name} has {len(shape)} dimensions, the manifest declares "
                f"{len(spec.dims)} ({list(spec.dims)}); re-export."
            )
        for axis, (got, want) in enumerate(zip(shape, spec.dims)):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                where = "last dimension" if axis == len(shape) - 1 else f"dimension {axis}"
                raise ContractMismatchError(
                    f"{model_path}: output {spec.name} has {where} {got}, the manifest declares {want}; the model "
                    "file belongs to another checkpoint. Re-export."
                )
    if task not in REQUIRED_OUTPUT:
        raise ContractMismatchError(
            f"{manifest_path} declares task {task!r}, which this runtime does not know "
            f"({', '.join(REQUIRED_OUTPUT)}); install the deberta-onnx release that wrote it."
        )
    required = REQUIRED_OUTPUT[task]
    if required not in session_outputs or not any(spec.name == required for spec in outputs):
        raise ContractMismatchError(
            f"{model_path} has no {required} output, which a {task} model needs; re-export the model."
        )


def check_sizes(
    session: _Session,
    *,
    task: str,
    hidden_size: int,
    labels: int,
    outputs: Sequence[TensorSpec],
    model_path: Path,
    manifest_path: Path,
) -> None:
    """Checks the manifest's ``model.hidden_size`` and label count against the last axis of each output the
    contract sizes by them (``hidden``, ``labels``), as the graph fixes it, else as the manifest's graph section
    declares it: a wrong size would otherwise fail at the first call, inside numpy.

    Raises:
        ContractMismatchError: names the field, both sizes and what to do.
    """
    declared = {spec.name: spec for spec in outputs}
    shapes = {node.name: list(node.shape or []) for node in session.get_outputs()}
    sizes = {HIDDEN_AXIS: ("model.hidden_size", hidden_size), LABELS_AXIS: ("model.labels", labels)}
    for spec in graph_outputs(task, token_embeddings=task == TASK_EMBEDDING):
        axis = spec.dims[-1]
        if spec.name not in declared or axis not in sizes:
            continue
        fixed = [d[-1] for d in (shapes.get(spec.name, []), list(declared[spec.name].dims)) if d]
        got = next((d for d in fixed if isinstance(d, int)), None)
        field, size = sizes[str(axis)]
        if got is not None and got != size:
            count = f"{size} label{'s' if size != 1 else ''}" if axis == LABELS_AXIS else str(size)
            raise ContractMismatchError(
                f"{manifest_path}: {field} is {count}, but {model_path}'s output {spec.name} has {got} values "
                "on its last axis; the manifest was edited or does not belong to this graph. Re-export the model."
            )
