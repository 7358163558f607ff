"""The int8 variants: ONNX Runtime's dynamic quantization, and static (QDQ) quantization with two rewrites of
its graph (float values back for the nodes that stay float; embedding rows gathered before they are
dequantized)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deberta_onnx.runtime.contract import INPUT_IDS

from ._errors import ExportError
from ._graph_edit import EXTERNAL_DATA_BYTES, matmul_summary, producers, prune, save
from ._quiet import quiet_quantization
from ._recipes import Recipe

__all__ = ["build_int8"]

_PRECISIONS = ("int8-dynamic", "int8-static")


def build_int8(recipe: Recipe, base_path: Path, out_path: Path, *,
               calibration: Sequence[dict[str, np.ndarray]] = ()) -> dict[str, Any]:
    """Quantizes the folded fp32 graph at ``base_path`` by ``recipe`` and writes it to ``out_path``.

    Args:
        recipe: an ``int8-dynamic`` or ``int8-static`` recipe.
        base_path: the fp32 graph after ``prepare_base``.
        out_path: where to write the new graph (``FILE.data`` beside it when over 2 GB).
        calibration: int8-static only: the inputs (one feed per text) whose activation ranges fix the scales.

    Returns:
        The count of MatMuls by precision and how the embeddings are stored, for the manifest.
    """
    if recipe.precision not in _PRECISIONS:
        raise ValueError(f"no recipe builds precision {recipe.precision!r}")
    model = onnx.load(str(base_path), load_external_data=False)
    nodes = _int8_nodes(model, recipe)
    external = base_path.stat().st_size > EXTERNAL_DATA_BYTES
    with quiet_quantization():
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        if recipe.precision == "int8-dynamic":
            quantize_dynamic(base_path, out_path, op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=nodes,
                             per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external,
                             extra_options={"MatMulConstBOnly": True})
        else:
            if not calibration:
                raise ValueError("int8-static needs calibration inputs")

            class _Feeds(CalibrationDataReader):
                def __init__(self) -> None:
                    self._feeds: Iterator[dict[str, np.ndarray]] = iter(calibration)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._feeds, None)

            # Activations uint8 (asymmetric: GELU outputs are mostly positive), weights int8 per channel:
            # ONNX Runtime's fastest combination on x86 CPUs. Scales are fixed here, once, so a text's vector
            # does not depend on the other texts in its batch.
            # MatMul outputs stay float: they feed bias and residual adds, not another int8 kernel.
            quantize_static(base_path, out_path, _Feeds(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=nodes, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
                            use_external_data_format=external,
                            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]})
            model = onnx.load(str(out_path))
            _float_for_float_consumers(model, set(nodes))
            _gather_before_dequantize(model)
            save(model, out_path)
    return matmul_summary(onnx.load(str(out_path), load_external_data=False))


def _int8_nodes(model: onnx.ModelProto, recipe: Recipe) -> list[str]:
    """Names of the nodes to quantize: MatMuls with a weight (a constant right operand and a computed left
    one), optionally without the feed-forward down-projections, and optionally the word-embedding Gather.

    MatMuls between two activations (DeBERTa's content-to-content, content-to-position, position-to-content
    and context products) stay fp32: both operands change per input, their outputs are summed and fed to a
    softmax, and per-tensor int8 error there is amplified.
    """
    weights = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in weights:
            rows, columns = [*weights[node.input[1]].dims, 0, 0][:2]
            if recipe.int8_ffn_output or rows <= columns:
                names.append(node.name)
        elif (node.op_type == "Gather" and recipe.int8_embeddings and node.input[0] in weights
              and node.input[1] == INPUT_IDS):
            names.append(node.name)
    if not names:
        raise ExportError("found no weight MatMul to quantize in the graph; this is a bug in deberta-onnx for this "
                          "checkpoint: please report it.")
    return names


def _float_for_float_consumers(model: onnx.ModelProto, quantized: set[str]) -> None:
    """Gives every node that is not quantized its float input back.

    ONNX Runtime's QDQ quantizer routes every reader of a quantized activation through the
    Quantize/Dequantize pair, so a LayerNorm output read by a MatMul (int8) and by the residual add beside it
    would reach the add rounded to 8 bits: the residual stream itself would be quantized, layer after layer.
    On deberta-v3-xsmall (random weights) that costs the held-out minimum cosine 0.9944 against 0.9998 without.
    """
    made_by = producers(model)
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dequantize = made_by.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = made_by.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                node.input[i] = quantize.input[0]
    prune(model)


def _gather_before_dequantize(model: onnx.ModelProto) -> None:
    """Swaps ``Gather(DequantizeLinear(table), ids)`` into ``DequantizeLinear(Gather(table, ids))``.

    The QDQ quantizer writes the int8 word-embedding table followed by its DequantizeLinear, which ONNX Runtime
    runs at every call: the whole table (128,100 x 768 floats, 393 MB, on deberta-v3-base) is dequantized to
    look up a few rows. With one scale for the table (per-tensor) the two commute exactly, so the rows are
    gathered in int8 and only they are dequantized, as the dynamic quantizer's graph does.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}  # initializer -> elements
    moved: dict[str, str] = {}  # Gather name -> Dequantize name
    for dequantize in model.graph.node:
        if dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in sizes:
            continue
        scale_and_zero = dequantize.input[1:]
        if any(sizes.get(name, 0) != 1 for name in scale_and_zero if name):
            continue  # per-axis scales do not commute with a Gather along that axis
        users = readers.get(dequantize.output[0], [])
        if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != dequantize.output[0]:
            continue
        gather = users[0]
        if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
            continue
        rows, out = f"{dequantize.input[0]}_rows", gather.output[0]
        gather.input[0] = dequantize.input[0]
        gather.output[0] = rows
        dequantize.input[0] = rows
        dequantize.output[0] = out
        moved[gather.name] = dequantize.name
    if not moved:
        return
    # Each Dequantize node now reads its Gather's output: it moves to just after it.
    by_name = {node.name: node for node in model.graph.node}
    order: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.name in moved.values():
            continue
        order.append(node)
        if node.name in moved:
            order.append(by_name[moved[node.name]])
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in order]
    model.graph.ClearField("node")
    model.graph.node.extend(copies)
