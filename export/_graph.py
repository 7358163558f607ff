"""The exported graph: a DeBERTa encoder and a pooling head in one ``torch.nn.Module``, and its ONNX export."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from deberta_onnx.runtime.contract import INPUTS, OPSET, SENTENCE_OUTPUT

from ._errors import ExportError

__all__ = ["POOLINGS", "EmbeddingGraph", "control_flow_nodes", "export_onnx", "masked_mean"]

POOLINGS = ("mean",)
_CONTROL_FLOW = {"If", "Loop", "Scan"}


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``attention_mask`` is 1. An all-padding row gives zeros, not NaN."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1.0)
    return summed / count


class EmbeddingGraph(torch.nn.Module):
    """``(input_ids, attention_mask) -> sentence_embedding``: the encoder and pooling, exported as one graph."""

    def __init__(self, encoder: torch.nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)


def control_flow_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of ``If``/``Loop``/``Scan`` nodes anywhere in the model (main graph and local functions)."""
    found = [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in _CONTROL_FLOW]
    for function in model.functions:
        found += [f"{function.name}/{n.op_type}:{n.name}" for n in function.node if n.op_type in _CONTROL_FLOW]
    return found


def export_onnx(graph: EmbeddingGraph, path: Path, *, opset: int = OPSET) -> onnx.ModelProto:
    """Exports with the dynamo exporter (dynamic batch and sequence axes) and saves to ``path``.

    The TorchScript exporter emits one ``If`` per layer for DeBERTa's relative positions; such nodes block
    CUDA graphs and stall ONNX Runtime's optimizers, so their presence fails the export.
    """
    # Batch 2 x sequence 8: neither dimension may be 0 or 1, which torch.export would specialise on.
    dummy_ids = torch.full((2, 8), 5, dtype=torch.long)
    dummy_mask = torch.ones((2, 8), dtype=torch.long)
    dummy_mask[1, 6:] = 0
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=8192)
    dynamic = {spec.name: {axis: {"batch": batch, "sequence": sequence}[name]
                           for axis, name in spec.dynamic_axes().items()} for spec in INPUTS}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph.eval(),
            (dummy_ids, dummy_mask),
            dynamo=True,
            input_names=[spec.name for spec in INPUTS],
            output_names=[SENTENCE_OUTPUT.name],
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
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
