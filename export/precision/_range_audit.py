"""The fp16 range audit: which nodes of the fp32 graph must stay fp32 because their values, or the sums they
form, come near fp16's largest finite value (65,504) on the calibration texts.

The quality gate runs fp16 on the CPU, where ONNX Runtime computes most fp16 nodes through fp32 and little can
overflow; on a GPU every fp16 tensor is fp16, and a trained DeBERTa overflows there (large hidden dimensions,
attention scores, the attention mask's minimum, LayerNorm's sum of squares). The audit reads what the fp32
graph computed on the calibration texts (``ActivationStats``) and keeps in fp32:

- every node that computes or reads a tensor whose largest |value| is above ``limit / margin``: the value
  would overflow, or come within ``margin`` of it for inputs the calibration texts did not show, where it is
  stored in fp16 (a producer in fp32 does not help a reader in fp16: the value is cast on the way);
- every LayerNorm whose input (for the fused residual LayerNorms, input + skip + bias) or whose sum of squared
  deviations over a row (the operand of the variance) is above that: the tensor may be fine while the
  statistics inside the node are not.

The result (``RangeAudit.to_manifest``) is stored in the fp16 variant's manifest entry under ``range_audit``,
with the nodes kept and why, so that another fp16 recipe (a CUDA one, say) can start from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from ._activations import LAYER_NORM_OPS, ActivationStats

__all__ = ["FP16_MARGIN", "FP16_MAX", "RangeAudit", "audit_fp16_range"]

FP16_MAX = 65504.0
# Kept in fp32 when within this factor of FP16_MAX: the calibration texts do not show every input's extremes.
FP16_MARGIN = 16.0
# Nodes that handle shapes, not values.
_SHAPE_OPS = ("Shape", "Size")
# How many of the largest tensors the manifest lists, for whoever tunes a recipe on them.
_LARGEST_LISTED = 20


@dataclass(frozen=True)
class RangeAudit:
    """What the audit found.

    Attributes:
        limit: fp16's largest finite value.
        margin: the safety factor; ``limit / margin`` is the threshold.
        texts: how many calibration texts were run.
        keep: node name -> why it stays fp32 (``{"op", "why", "max_abs"}``).
        largest: the tensors with the largest |value|, largest first, ``(name, max_abs)``.
    """

    limit: float
    margin: float
    texts: int
    keep: dict[str, dict[str, Any]] = field(default_factory=dict)
    largest: list[tuple[str, float]] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return self.limit / self.margin

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``range_audit`` entry (plain JSON)."""
        return {
            "limit": self.limit,
            "margin": self.margin,
            "threshold": self.threshold,
            "texts": self.texts,
            "kept_fp32": {name: dict(entry) for name, entry in sorted(self.keep.items())},
            "largest_tensors": [{"tensor": name, "max_abs": value} for name, value in self.largest],
        }


def audit_fp16_range(model: onnx.ModelProto, stats: ActivationStats, *, limit: float = FP16_MAX,
                     margin: float = FP16_MARGIN) -> RangeAudit:
    """Decides which nodes of ``model`` (the fp32 graph ``stats`` was collected on) stay fp32 (see the module
    docstring)."""
    threshold = limit / margin
    keep: dict[str, dict[str, Any]] = {}

    def hold(node: onnx.NodeProto, why: str, value: float) -> None:
        if node.op_type in _SHAPE_OPS:
            return
        seen = keep.get(node.name)
        if seen is None or value > seen["max_abs"]:
            keep[node.name] = {"op": node.op_type, "why": why, "max_abs": value}

    large = {name: value for name, value in stats.max_abs.items() if value > threshold}
    for node in model.graph.node:
        for name in node.output:
            if name in large:
                hold(node, f"computes {name}", large[name])
        for name in node.input:
            if name in large:
                hold(node, f"reads {name}", large[name])
        if node.op_type in LAYER_NORM_OPS and node.name in stats.layer_norm:
            peak, squares = stats.layer_norm[node.name]
            if peak > threshold:
                hold(node, "normalises values this large", peak)
            if squares > threshold:
                hold(node, "sum of squares behind its variance", squares)
    largest = sorted(stats.max_abs.items(), key=lambda item: -item[1])[:_LARGEST_LISTED]
    return RangeAudit(limit=limit, margin=margin, texts=stats.texts, keep=keep, largest=largest)
