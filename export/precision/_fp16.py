"""The fp16 variant: ONNX Runtime's float16 converter, with what would lose accuracy or overflow in fp16 kept in
fp32 (normalisation, softmax, reductions, the relative-position bucket arithmetic and the pooling)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from .._errors import ExportError
from .._quiet import quiet_quantization
from ._onnx_edit import ancestors, matmul_summary, producers, prune, save
from ._recipes import Recipe

__all__ = ["build_fp16"]

_PROTOBUF_LIMIT = 2**31 - 1
# Kept in fp32 in the fp16 graph: reductions (ReduceMean, Pow and Sqrt are DeBERTa v1's hand-written LayerNorm,
# whose squares overflow fp16 first) and, unless the recipe says otherwise, normalisation and softmax.
# SkipLayerNormalization is the export's fused residual add + LayerNorm: keeping it fp32 keeps the residual stream
# fp32 too, at the price of casts around every one.
_FP16_KEEP_OPS = ("ReduceMean", "ReduceSum", "Pow", "Sqrt")
_NORMALIZATION_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax")
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Where", "Neg", "Clip")


def build_fp16(recipe: Recipe, base_path: Path, out_path: Path, *, keep_nodes: Iterable[str] = ()) -> dict[str, Any]:
    """Converts the folded fp32 graph at ``base_path`` to fp16 (fp32 inputs and output) and writes it to
    ``out_path``; returns the count of fp32 nodes by op type and of MatMuls by precision, for the manifest.

    ``keep_nodes`` names nodes that stay fp32 whatever the recipe (the range audit's, and any asked for).
    """
    converted, kept = _to_fp16(onnx.load(str(base_path)), recipe, keep_nodes)
    save(converted, out_path)
    return {"fp32_nodes": kept, **matmul_summary(converted)}


def _to_fp16(model: onnx.ModelProto, recipe: Recipe, keep_nodes: Iterable[str] = ()
             ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Converts to fp16 with fp32 inputs and output; returns the model and the count of fp32 nodes by op type."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError("fp16 conversion needs the fp32 graph in one protobuf (under 2 GB); this checkpoint is "
                          "larger. Export fp32 and int8 variants only.")
    # Type entries for initializers would be rewritten to fp16 even where the initializer stays fp32.
    initializers = {init.name for init in model.graph.initializer}
    value_info = [info for info in model.graph.value_info if info.name not in initializers]
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(value_info)
    model = onnx.shape_inference.infer_shapes(model)
    ops = {*DEFAULT_OP_BLOCK_LIST, *_FP16_KEEP_OPS, *(() if recipe.fp16_normalization else _NORMALIZATION_OPS),
           *(() if recipe.fp16_elementwise else _ELEMENTWISE)}
    names = _index_nodes(model) | _pooling_nodes(model) | (set(keep_nodes) & {node.name for node in model.graph.node})
    types = {info.name: info.type.tensor_type.elem_type for info in model.graph.value_info}
    kept = Counter(node.op_type for node in model.graph.node
                   if (node.op_type in ops or node.name in names) and node.op_type not in ("Shape", "Size")
                   and types.get(node.output[0]) == TensorProto.FLOAT)
    with quiet_quantization():
        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                             op_block_list=sorted(ops), node_block_list=sorted(names))
    _drop_cast_pairs(converted)
    return converted, dict(sorted(kept.items()))


def _index_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes that compute gather indices: DeBERTa's relative-position buckets, computed with a float log.
    In fp16 a bucket could round to its neighbour, so they stay fp32."""
    gathers = [node.input[1] for node in model.graph.node if node.op_type in ("Gather", "GatherElements", "GatherND")]
    return ancestors(model, gathers)


def _pooling_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes after the encoder's last MatMul on the way to the output: the last residual add and LayerNorm and
    the masked-mean pooling, whose sum over up to 512 tokens could overflow fp16."""
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    encoder = ancestors(model, [name for node in matmuls for name in node.input]) | {node.name for node in matmuls}
    return ancestors(model, [out.name for out in model.graph.output]) - encoder


def _drop_cast_pairs(model: onnx.ModelProto) -> None:
    """Between two fp32 nodes the converter puts a Cast to fp16 and one back; bypass such pairs so the value
    stays fp32 (only pairs the converter made, recognised by their names, are touched)."""
    made_by = producers(model)
    rename: dict[str, str] = {}
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "Cast" and node.name.endswith("_cast_to_fp32_node"):
            parent = made_by.get(node.input[0])
            if parent is not None and parent.op_type == "Cast" and parent.name.endswith("_cast_to_fp16_node"):
                rename[node.output[0]] = parent.input[0]
                dropped.add(node.name)
    for node in model.graph.node:
        if node.name not in dropped:
            for i, name in enumerate(node.input):
                node.input[i] = rename.get(name, name)
    _drop_output_round_trips(model)
    # The bypassed pairs (and any Cast to fp16 that only they read) are dead now.
    prune(model)


def _drop_output_round_trips(model: onnx.ModelProto) -> None:
    """With fp32 outputs kept, the converter ends a graph whose last node is fp32 (the pooling) with a Cast to fp16
    and one back to fp32: the vector would be rounded to fp16 at the very end. The last fp32 node writes the
    output itself instead."""
    graph = model.graph
    made_by = producers(model)
    outputs = {out.name for out in graph.output}
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or node.output[0] not in outputs or to != TensorProto.FLOAT:
            continue
        parent = made_by.get(node.input[0])
        source = made_by.get(parent.input[0]) if parent is not None else None
        if (parent is None or source is None or parent.op_type != "Cast"
                or not parent.name.endswith("_cast_to_fp16_node") or parent.input[0] in outputs):
            continue
        value, output = parent.input[0], node.output[0]
        source.output[list(source.output).index(value)] = output
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == value:
                    other.input[i] = output
        graph.node.remove(node)
        graph.node.remove(parent)
        stale = [info for info in graph.value_info if info.name == value]
        for info in stale:
            graph.value_info.remove(info)
