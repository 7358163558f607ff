"""Outlier channels out of the int8 MatMuls: a few input channels of a weight MatMul, found on the calibration
texts far above the others, are computed in fp32 beside it, and the int8 MatMul sees the rest.

Trained encoders put a few hidden dimensions at hundreds to thousands of times the median (see
``_outliers.py``). An int8 activation has one scale per tensor, so one such channel leaves the others a
handful of the 256 levels: the MatMul's result is noise. Splitting them off (as LLM.int8() does, with the
channels fixed at export instead of found per call) is exact in fp32::

    X @ W  =  (X * mask) @ W_main  +  X[..., outliers] @ W[outliers, :]

where ``mask`` is 0 on the outlier channels and ``W_main`` is ``W`` with those rows zeroed. The first product is
quantized like any other; the second is a ``[tokens, k] x [k, n]`` fp32 product for ``k`` outlier channels,
next to nothing beside the ``[tokens, hidden] x [hidden, n]`` one. It works for any activation, where smoothing
by per-channel scales (SmoothQuant) has to fold the scales into the producer: a LayerNorm whose output also
feeds the residual stream, or a GELU, which no scale passes through.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._activations import ActivationStats

__all__ = ["OUTLIER_RATIO", "find_outlier_channels", "split_outlier_channels"]

# A channel is an outlier when its largest |value| on the calibration texts exceeds this many times the median
# channel's. A random-weight LayerNorm output's channels stay within 2x of each other and a GELU output's
# within 4x; a trained encoder's outlier dimensions are 100x to 1,000x and more.
OUTLIER_RATIO = 8.0
# At most this fraction of a tensor's channels is split off, the largest first: past that they are no longer a
# few outliers, and computing them in fp32 would cost much of what int8 saves (the mixed recipe is for that).
_MAX_FRACTION = 1 / 16
# ... but never fewer than this many (small test models have 32 channels).
_MIN_ALLOWED = 8


def find_outlier_channels(stats: ActivationStats, tensors: Iterable[str], *, ratio: float = OUTLIER_RATIO
                          ) -> dict[str, list[int]]:
    """Tensor -> its outlier channels (largest |value| over ``ratio`` times the median channel's), for the
    ``tensors`` that have any; at most ``_MAX_FRACTION`` of a tensor's channels, the largest first."""
    found: dict[str, list[int]] = {}
    for name in tensors:
        channels = stats.channel_max.get(name)
        if channels is None or channels.size < 8:
            continue
        median = float(np.median(channels))
        if not median > 0:
            continue
        outliers = np.flatnonzero(channels > ratio * median)
        budget = max(_MIN_ALLOWED, int(channels.size * _MAX_FRACTION))
        if len(outliers):
            largest = outliers[np.argsort(-channels[outliers], kind="stable")][:budget]
            found[name] = sorted(int(c) for c in largest)
    return found


def split_outlier_channels(model: onnx.ModelProto, channels: dict[str, list[int]], matmuls: Iterable[str]
                           ) -> dict[str, Any]:
    """Rewrites each of ``matmuls`` (weight MatMuls, by name) whose left operand has outlier ``channels`` into
    an int8-ready MatMul on the other channels plus an fp32 MatMul on the outliers (see the module docstring).
    The rewritten MatMul keeps its name, so recipes and quantizers still pick it by name. Modifies ``model``.

    Returns:
        For the manifest: how many MatMuls were split, and the outlier channels of each tensor split.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    wanted = set(matmuls)
    targets = [node for node in graph.node if node.name in wanted and node.op_type == "MatMul"
               and node.input[0] in channels and node.input[1] in initializers]
    if not targets:
        return {"matmuls_split": 0, "tensors": {}}
    sources = {node.input[0] for node in targets}
    new_inits: list[onnx.TensorProto] = []
    before: dict[str, list[onnx.NodeProto]] = {}  # tensor -> nodes to place right after its producer
    for tensor in sorted(sources):
        index = np.asarray(channels[tensor], dtype=np.int64)
        width = _width(initializers, targets, tensor)
        mask = np.ones(width, dtype=np.float32)
        mask[index] = 0.0
        new_inits += [numpy_helper.from_array(mask, f"{tensor}_outlier_mask"),
                      numpy_helper.from_array(index, f"{tensor}_outlier_index")]
        before[tensor] = [
            helper.make_node("Mul", [tensor, f"{tensor}_outlier_mask"], [f"{tensor}_main"],
                             name=f"{tensor}_outlier_mask_mul"),
            helper.make_node("Gather", [tensor, f"{tensor}_outlier_index"], [f"{tensor}_outliers"],
                             name=f"{tensor}_outlier_gather", axis=-1),
        ]
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for node in targets:
        tensor, weight_name, out = node.input[0], node.input[1], node.output[0]
        weight = numpy_helper.to_array(initializers[weight_name])
        rows = channels[tensor]
        main = weight.copy()
        main[rows, :] = 0.0
        new_inits += [numpy_helper.from_array(main, f"{weight_name}_main_{node.name}"),
                      numpy_helper.from_array(np.ascontiguousarray(weight[rows, :]),
                                              f"{weight_name}_outlier_rows_{node.name}")]
        int8_part = helper.make_node("MatMul", [f"{tensor}_main", f"{weight_name}_main_{node.name}"],
                                     [f"{out}_int8_part"], name=node.name)
        fp32_part = helper.make_node("MatMul", [f"{tensor}_outliers", f"{weight_name}_outlier_rows_{node.name}"],
                                     [f"{out}_outlier_part"], name=f"{node.name}_outliers")
        total = helper.make_node("Add", [f"{out}_int8_part", f"{out}_outlier_part"], [out],
                                 name=f"{node.name}_outliers_add")
        replaced[node.name] = [int8_part, fp32_part, total]
    order: list[onnx.NodeProto] = []
    inputs = {value.name for value in graph.input}
    for tensor in sources & inputs:
        order += before.pop(tensor)
    for node in graph.node:
        order += replaced.get(node.name, [node]) if node.op_type == "MatMul" else [node]
        for name in node.output:
            order += before.pop(name, [])
    graph.ClearField("node")
    graph.node.extend(order)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    return {"matmuls_split": len(targets),
            "tensors": {tensor: channels[tensor] for tensor in sorted(sources)}}


def _width(initializers: dict[str, onnx.TensorProto], targets: list[onnx.NodeProto], tensor: str) -> int:
    """The channel count of ``tensor``: the rows of the weights it multiplies."""
    for node in targets:
        if node.input[0] == tensor:
            return int(initializers[node.input[1]].dims[0])
    raise KeyError(tensor)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)

