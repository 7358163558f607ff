"""Sensitivity-guided mixed precision, the int8 recipes' last resort: keep in fp32 the fewest weight MatMuls
that let the graph pass the quality gate, chosen by how much int8 costs each of them.

Each weight MatMul's cost is measured on its own, on the calibration texts: its fp32 input ``X`` (after the
outlier split) and weight ``W`` are rounded as the quantizer rounds them (``X`` to uint8 with one scale over
the texts, or per text for dynamic quantization; ``W`` to int8 per output channel) and the relative error
``|Xq Wq - X W| / |X W|`` is their cost. The MatMuls are ranked by it, and ``search_fp32_matmuls`` keeps the
first 1, 2, 4, ... of them in fp32 until the graph passes the gate's test on calibration texts (against the
fp32 graph, which matches PyTorch to fp32 rounding) and then the held-out gate itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, TASK_EMBEDDING
from deberta_onnx.runtime.tokenization import TextTokenizer

from ._quality import ExampleFeed, HeldOut, Readout, gate_feeds, gate_items, gate_readout

__all__ = ["probe_set", "rank_matmuls", "search_fp32_matmuls"]

# Calibration texts the ranking and the search's probes run on: enough to see each MatMul's range.
PROBE_TEXTS = 64


def rank_matmuls(model: onnx.ModelProto, matmuls: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], *,
                 per_text_scale: bool) -> list[tuple[str, float]]:
    """``(MatMul, relative int8 error)``, largest first, for the weight ``matmuls`` of ``model`` (an fp32 graph,
    after the outlier split) on ``feeds``. ``per_text_scale``: one activation scale per text (dynamic
    quantization) rather than one over all texts (static)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = [node for node in graph.node if node.name in set(matmuls) and node.input[1] in initializers]
    inputs = sorted({node.input[0] for node in nodes})
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [dict(zip(inputs, session.run(inputs, feed))) for feed in feeds]
    ranking = []
    for node in nodes:
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        columns = np.abs(weight).max(axis=0)
        step = np.where(columns > 0, columns / 127.0, 1.0)
        rounded_weight = np.clip(np.rint(weight / step), -127, 127) * step
        values = [run[node.input[0]].reshape(-1, weight.shape[0]).astype(np.float64) for run in runs]
        low, high = min(0.0, *(float(v.min()) for v in values)), max(0.0, *(float(v.max()) for v in values))
        error = total = 0.0
        for x in values:
            if per_text_scale:
                low, high = min(0.0, x.min()), max(0.0, x.max())
            exact = x @ weight
            error += float(((_uint8(x, low, high) @ rounded_weight - exact) ** 2).sum())
            total += float((exact**2).sum())
        ranking.append((node.name, (error / total) ** 0.5 if total > 0 else 0.0))
    return sorted(ranking, key=lambda item: -item[1])


def _uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``x`` rounded to 256 levels over ``[low, high]`` (asymmetric uint8, as ONNX Runtime quantizes inputs)."""
    scale = (high - low) / 255.0 or 1.0
    zero = np.rint(-low / scale)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def probe_set(fp32_path: Path, tokenizer: TextTokenizer, texts: Sequence[str], *,
              readout: Readout | None = None, inputs: Sequence[str] = (INPUT_IDS, ATTENTION_MASK),
              example_feed: ExampleFeed | None = None) -> HeldOut:
    """``texts`` as the gate runs them (alone and in batches, fed by ``example_feed`` where the graph has one), with
    the fp32 graph's vectors (``readout``: what the gate compares; default an embedding graph's) as reference."""
    readout = readout or gate_readout(TASK_EMBEDDING)
    alone, batches = gate_feeds(tokenizer, gate_items(readout, texts), inputs, example_feed)
    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    reference = readout.read(lambda feed: session.run(list(readout.outputs), dict(zip(inputs, feed))), batches,
                             tokenizer.max_length)
    return HeldOut(texts=list(texts), alone=alone, batches=batches, reference=reference, readout=readout,
                   inputs=tuple(inputs), width=tokenizer.max_length)


def search_fp32_matmuls(ranking: Sequence[tuple[str, float]], build: Callable[[list[str]], dict[str, Any]],
                        failure: Callable[[], tuple[str | None, dict[str, Any]]], say: Callable[[str], None]
                        ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Keeps the first 1, 2, 4, ... MatMuls of ``ranking`` in fp32 (``build(names)`` writes that graph,
    ``failure()`` tests it: why it fails or None, and its report) until one passes, up to half of them.

    Returns:
        ``(what build returned for the graph that passed, or None, one record per graph tried)``.
    """
    tried: list[dict[str, Any]] = []
    count = 1
    limit = max(1, len(ranking) // 2)
    while True:
        count = min(count, limit)
        keep = [name for name, _ in ranking[:count]]
        nodes = build(keep)
        why, report = failure()
        tried.append({"fp32_matmuls": count, "min_cosine": report["min_cosine"],
                      "batch_invariance": report["batch_invariance"], "passed": why is None})
        say(f"  {count} MatMul(s) in fp32: min cosine {report['min_cosine']:.8f} on {report['sentences']} "
            f"calibration texts{'' if why is None else ' (' + why + ')'}")
        if why is None:
            return nodes, tried
        if count >= limit:
            return None, tried
        count *= 2
