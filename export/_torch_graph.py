"""The exported graph: a DeBERTa encoder and a pooling head in one ``torch.nn.Module``, and its ONNX export."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch

from deberta_onnx.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    OPSET,
    POOLINGS,
    TASK_EMBEDDING,
    TASK_QUESTION_ANSWERING,
    TASKS,
    TOKEN_TYPE_IDS,
    TensorSpec,
    graph_inputs,
    graph_outputs,
)

from ._errors import ExportError

__all__ = [
    "POOLINGS",
    "ClassifierGraph",
    "EmbeddingGraph",
    "control_flow_nodes",
    "export_onnx",
    "first_token",
    "l2_normalize",
    "masked_max",
    "masked_mean",
]

_CONTROL_FLOW = {"If", "Loop", "Scan"}
# As torch.nn.functional.normalize (and so sentence-transformers' Normalize module): a zero vector stays zero.
_NORM_EPS = 1e-12


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``attention_mask`` is 1. An all-padding row gives zeros, not NaN."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1.0)
    return summed / count


def masked_max(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-dimension maximum over the token vectors where ``attention_mask`` is 1.

    Padding is filled with the dtype's lowest finite value, never -inf, and an all-padding row gives zeros, so
    the output is always finite.
    """
    keep = attention_mask.unsqueeze(-1) > 0
    lowest = torch.finfo(hidden.dtype).min
    pooled = hidden.masked_fill(~keep, lowest).amax(dim=1)
    return torch.where(keep.any(dim=1), pooled, torch.zeros_like(pooled))


def first_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first token's vector ([CLS] in DeBERTa's inputs, which are right-padded); zeros for an all-padding row."""
    return hidden[:, 0] * attention_mask[:, :1].to(hidden.dtype)


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Scales each row to unit L2 norm; an all-zero row stays zero."""
    return vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp(min=_NORM_EPS)


_POOL = {"mean": masked_mean, "cls": first_token, "max": masked_max}


class EmbeddingGraph(torch.nn.Module):
    """``(input_ids, attention_mask) -> sentence_embedding[, token_embeddings]``: encoder, pooling and optional
    L2 normalisation, exported as one graph.

    Args:
        encoder: the Hugging Face DeBERTa encoder (its output has ``last_hidden_state``).
        pooling: one of ``POOLINGS``.
        normalize: L2-normalise the sentence vector inside the graph.
        token_embeddings: add the last hidden state as a second output.

    Raises:
        ValueError: unknown pooling.
    """

    def __init__(self, encoder: torch.nn.Module, pooling: str = "mean", *, normalize: bool = False,
                 token_embeddings: bool = False) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.token_embeddings = token_embeddings

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return graph_inputs()

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return graph_outputs(TASK_EMBEDDING, token_embeddings=self.token_embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = _POOL[self.pooling](hidden, attention_mask)
        if self.normalize:
            pooled = l2_normalize(pooled)
        return (pooled, hidden) if self.token_embeddings else pooled


def control_flow_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of ``If``/``Loop``/``Scan`` nodes anywhere in the model (main graph and local functions)."""
    found = [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in _CONTROL_FLOW]
    for function in model.functions:
        found += [f"{function.name}/{n.op_type}:{n.name}" for n in function.node if n.op_type in _CONTROL_FLOW]
    return found


class ClassifierGraph(torch.nn.Module):
    """``(input_ids, attention_mask[, token_type_ids]) -> logits``: a sequence or token classification model
    (encoder and head) exported as one graph; for ``question-answering``, ``-> (start_logits, end_logits)``.

    Args:
        model: a transformers ``...ForSequenceClassification``, ``...ForTokenClassification`` or
            ``...ForQuestionAnswering`` model.
        task: ``sequence-classification``, ``token-classification`` or ``question-answering``.
        token_type_ids: take segment ids as a third input (only for checkpoints with ``type_vocab_size > 0``).

    Raises:
        ValueError: ``task`` is not a classification task.
    """

    def __init__(self, model: torch.nn.Module, task: str, *, token_type_ids: bool = False) -> None:
        super().__init__()
        if task not in TASKS or task == TASK_EMBEDDING:
            raise ValueError(f"task must be a task with a head, got {task!r}")
        self.model = model
        self.task = task
        self.token_type_ids = token_type_ids

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return graph_inputs(token_type_ids=self.token_type_ids)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return graph_outputs(self.task)

    @property
    def labels(self) -> int:
        """How many logits the head gives per row (or per token); the quality gate reads one-label models apart."""
        config: Any = self.model.config
        return int(config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.task == TASK_QUESTION_ANSWERING:
            return output.start_logits, output.end_logits
        return output.logits


def _dummy_inputs(specs: tuple[TensorSpec, ...]) -> tuple[torch.Tensor, ...]:
    # Batch 2 x sequence 8: neither dimension may be 0 or 1, which torch.export would specialise on.
    dummies = {
        INPUT_IDS: torch.full((2, 8), 5, dtype=torch.long),
        ATTENTION_MASK: torch.ones((2, 8), dtype=torch.long),
        TOKEN_TYPE_IDS: torch.zeros((2, 8), dtype=torch.long),
    }
    dummies[ATTENTION_MASK][1, 6:] = 0
    dummies[TOKEN_TYPE_IDS][:, 4:] = 1
    return tuple(dummies[spec.name] for spec in specs)


def export_onnx(graph: torch.nn.Module, path: Path, *, opset: int = OPSET,
                translations: Mapping[Callable[..., Any], Callable[..., Any]] | None = None) -> onnx.ModelProto:
    """Exports with the dynamo exporter (dynamic batch and sequence axes) and saves to ``path``.

    ``graph`` is an ``EmbeddingGraph`` or another module with ``inputs`` and ``outputs`` tensor specs (the
    contract's names, in forward's argument and return order). ``translations`` maps custom torch ops the
    module calls to their ONNX translation (the exporter's ``custom_translation_table``).

    The TorchScript exporter emits one ``If`` per layer for DeBERTa's relative positions; such nodes block
    CUDA graphs and stall ONNX Runtime's optimizers, so their presence fails the export.
    """
    inputs: tuple[TensorSpec, ...] = graph.inputs  # type: ignore[assignment]
    outputs: tuple[TensorSpec, ...] = graph.outputs  # type: ignore[assignment]
    axes = {"batch": torch.export.Dim("batch", min=1, max=4096),
            "sequence": torch.export.Dim("sequence", min=1, max=8192),
            "choices": torch.export.Dim("choices", min=1, max=1024),
            "masks": torch.export.Dim("masks", min=1, max=8192)}
    dynamic = {spec.name: {axis: axes[name] for axis, name in spec.dynamic_axes().items()} for spec in inputs}
    # A graph whose inputs are not the plain [batch, sequence] ones makes its own (multiple choice, fill-mask).
    make_dummies = getattr(graph, "dummy_inputs", None)
    dummies = make_dummies() if make_dummies is not None else _dummy_inputs(inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph.eval(),
            dummies,
            dynamo=True,
            input_names=[spec.name for spec in inputs],
            output_names=[spec.name for spec in outputs],
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=True,
            verbose=False,
            custom_translation_table=dict(translations) if translations else None,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    # The exporter annotates every node with its Python stack trace, module path and FX node (local file paths of
    # the exporting machine, half of a tiny model's file); ONNX Runtime reads none of it.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    # Files over protobuf's 2 GB limit keep their weights in model.onnx.data beside the graph.
    program.save(str(path), external_data=_needs_external_data(graph))
    model = onnx.load(str(path), load_external_data=False)
    found = control_flow_nodes(model)
    if found:
        raise ExportError(
            f"the exported graph has control-flow nodes ({', '.join(found[:5])}); they block CUDA graphs and "
            "ONNX Runtime's optimizers. This is a bug in deberta-onnx for this checkpoint: please report it."
        )
    return model


def _needs_external_data(module: torch.nn.Module) -> bool:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    return size > 1_800_000_000
