"""What the fp32 graph's tensors hold on the calibration texts: the largest magnitude of every float tensor, per
channel for the tensors asked for, and the sums LayerNorm forms (its input and the sum of squares behind its
variance). The fp16 range audit and the int8 outlier split read them; one pass serves both."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

__all__ = ["LAYER_NORM_OPS", "ActivationStats", "collect_activation_stats"]

LAYER_NORM_OPS = ("LayerNormalization", "SkipLayerNormalization")
# Outputs requested per session run: all of a large graph's tensors at once would hold them all in memory.
_OUTPUTS_PER_PASS = 4000


@dataclass
class ActivationStats:
    """Largest magnitudes seen on ``texts`` calibration inputs.

    Attributes:
        texts: how many inputs were run.
        max_abs: tensor name -> largest |value| (every float tensor the graph computes, and its float
            initializers).
        channel_max: tensor name -> largest |value| per channel (the last axis), for the tensors asked for.
        layer_norm: LayerNorm node name -> ``(largest |input|, largest sum of squared deviations over a row)``;
            for the fused residual LayerNorms the input is the sum they form (input + skip + bias), which is no
            tensor of the graph.
    """

    texts: int = 0
    max_abs: dict[str, float] = field(default_factory=dict)
    channel_max: dict[str, np.ndarray] = field(default_factory=dict)
    layer_norm: dict[str, tuple[float, float]] = field(default_factory=dict)

    def _update(self, name: str, value: np.ndarray, per_channel: bool) -> None:
        magnitude = np.abs(value)
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), float(magnitude.max(initial=0.0)))
        if per_channel and value.ndim >= 1 and value.size:
            channels = magnitude.reshape(-1, value.shape[-1]).max(axis=0)
            seen = self.channel_max.get(name)
            self.channel_max[name] = channels if seen is None else np.maximum(seen, channels)


def collect_activation_stats(model_path: Path, feeds: Sequence[dict[str, np.ndarray]], *,
                             channels_of: Iterable[str] = ()) -> ActivationStats:
    """Runs the fp32 graph at ``model_path`` on ``feeds`` (on the CPU) and records what ``ActivationStats`` holds.

    Args:
        model_path: an fp32 ONNX graph (weights inside it or beside it).
        feeds: the inputs, one dict per run.
        channels_of: tensors whose per-channel maxima to keep as well.
    """
    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    wanted_channels = set(channels_of)
    produced = [name for node in graph.node for name in node.output if name]
    norms = [node for node in graph.node if node.op_type in LAYER_NORM_OPS]
    stats = ActivationStats(texts=len(feeds))
    for name, init in initializers.items():
        if init.data_type == onnx.TensorProto.FLOAT:
            stats._update(name, numpy_helper.to_array(init), name in wanted_channels)
    existing = {out.name for out in graph.output}
    for start in range(0, len(produced), _OUTPUTS_PER_PASS):
        names = produced[start : start + _OUTPUTS_PER_PASS]
        del graph.output[len(existing):]
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in existing)
        session = _session(model)
        requested = [out.name for out in session.get_outputs()]
        for feed in feeds:
            values = dict(zip(requested, session.run(requested, feed)))
            for name in names:
                value = values.get(name)
                if value is not None and value.dtype == np.float32:
                    stats._update(name, value, name in wanted_channels)
            for node in norms:
                _layer_norm_sums(stats, node, values, initializers)
    return stats


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Tensors asked for as outputs must keep their values: no fusion may remove them.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _layer_norm_sums(stats: ActivationStats, node: onnx.NodeProto, values: dict[str, np.ndarray],
                     initializers: dict[str, onnx.TensorProto]) -> None:
    """The input a LayerNorm normalises (for the fused ones, input + skip + bias) and its row-wise sum of
    squared deviations, the operand of the variance."""
    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        init = initializers.get(name)
        return numpy_helper.to_array(init) if init is not None else None

    parts = [node.input[0]]
    if node.op_type.startswith("Skip"):
        parts.append(node.input[1])
        if len(node.input) > 4 and node.input[4]:
            parts.append(node.input[4])
    found = [value(name) for name in parts]
    arrays = [array for array in found if array is not None]
    if len(arrays) < len(found):
        return
    total = np.sum(np.broadcast_arrays(*arrays), axis=0, dtype=np.float64) if len(arrays) > 1 else arrays[0]
    total = np.asarray(total, dtype=np.float64)
    squares = ((total - total.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
    seen = stats.layer_norm.get(node.name, (0.0, 0.0))
    stats.layer_norm[node.name] = (max(seen[0], float(np.abs(total).max(initial=0.0))),
                                   max(seen[1], float(squares.max(initial=0.0))))
