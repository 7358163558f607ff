"""The int8 variants: ONNX Runtime's dynamic quantization and static (QDQ) quantization of the weight MatMuls,
around rewrites of the graph: outlier input channels split off into fp32 beforehand (``_outlier_split``),
padding zeroed before dynamic quantization, float values back for the nodes that stay float in the QDQ graph,
and the word embeddings stored in int8 with one scale per row, looked up before they are scaled."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, SEQUENCE_AXIS

from .._errors import ExportError
from .._quiet import quiet_quantization
from ._activations import ActivationStats
from ._onnx_edit import EXTERNAL_DATA_BYTES, matmul_summary, producers, prune, save
from ._outlier_split import find_outlier_channels, split_outlier_channels
from ._recipes import Recipe

__all__ = ["build_int8", "int8_source", "int8_units"]

_PRECISIONS = ("int8-dynamic", "int8-static")


def build_int8(recipe: Recipe, base_path: Path, out_path: Path, *,
               calibration: Sequence[dict[str, np.ndarray]] = (), stats: ActivationStats | None = None,
               keep_fp32: Collection[str] = ()) -> dict[str, Any]:
    """Quantizes the folded fp32 graph at ``base_path`` by ``recipe`` and writes it to ``out_path``.

    Args:
        recipe: an ``int8-dynamic`` or ``int8-static`` recipe.
        base_path: the fp32 graph after ``prepare_base``.
        out_path: where to write the new graph (``FILE.data`` beside it when over 2 GB).
        calibration: int8-static only: the inputs (one feed per text) whose activation ranges fix the scales.
        stats: what the fp32 graph's tensors hold on the calibration texts; with ``recipe.split_outliers``, the
            weight MatMuls' outlier input channels found there run in fp32 beside them (``_outlier_split``).
        keep_fp32: names of weight MatMuls (and of the word-embedding lookup) to leave in fp32.

    Returns:
        The count of MatMuls by precision, how the embeddings are stored, the outlier channels split off and
        the nodes kept in fp32, for the manifest.
    """
    if recipe.precision not in _PRECISIONS:
        raise ValueError(f"no recipe builds precision {recipe.precision!r}")
    model = onnx.load(str(base_path))
    matmuls, lookup, kept, split = int8_source(model, recipe, stats, keep_fp32)
    if recipe.precision == "int8-dynamic":
        _zero_padding(model, matmuls)
    source = out_path.with_name(f"{out_path.name}.fp32-source.onnx")
    save(model, source)
    external = source.stat().st_size > EXTERNAL_DATA_BYTES
    try:
        _quantize(recipe, source, out_path, matmuls, calibration, external)
    finally:
        for path in out_path.parent.glob(f"{source.name}*"):
            path.unlink()
    model = onnx.load(str(out_path))
    if recipe.precision == "int8-static":
        _float_for_float_consumers(model, set(matmuls))
    if lookup is not None:
        _embedding_rows_int8(model)
    save(model, out_path)
    summary = matmul_summary(onnx.load(str(out_path), load_external_data=False))
    if split["matmuls_split"]:
        # The outlier channels' small fp32 products beside the int8 MatMuls are no weight MatMul kept in fp32.
        counts = summary["matmuls"]
        counts["fp32_weight"] -= split["matmuls_split"]
        counts["fp32_outlier_channels"] = split["matmuls_split"]
        summary["matmuls"] = {kind: count for kind, count in sorted(counts.items()) if count}
    return {**summary, "outlier_split": split, "kept_fp32": kept}


def int8_source(model: onnx.ModelProto, recipe: Recipe, stats: ActivationStats | None, keep_fp32: Collection[str]
                ) -> tuple[list[str], str | None, list[str], dict[str, Any]]:
    """The fp32 graph the quantizer starts from: ``model`` with its outlier channels split off (in place).

    Returns:
        ``(MatMuls to quantize, the embedding lookup to store in int8 or None, the units kept fp32, the split's
        summary)``.
    """
    matmuls, lookup = int8_units(model)
    kept = sorted(name for name in keep_fp32 if name in matmuls or name == lookup)
    matmuls = [name for name in matmuls if name not in kept]
    lookup = None if lookup in kept else lookup
    split: dict[str, Any] = {"matmuls_split": 0, "tensors": {}}
    if recipe.split_outliers and stats is not None:
        channels = find_outlier_channels(stats, {node.input[0] for node in model.graph.node if node.name in matmuls})
        split = split_outlier_channels(model, channels, matmuls)
    return matmuls, lookup, kept, split


def _quantize(recipe: Recipe, source: Path, out_path: Path, matmuls: list[str],
              calibration: Sequence[dict[str, np.ndarray]], external: bool) -> None:
    """ONNX Runtime's quantizer on ``matmuls`` (weights int8 per output channel)."""
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
            quantize_dynamic(source, out_path, op_types_to_quantize=["MatMul"], nodes_to_quantize=matmuls,
                             per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external,
                             extra_options={"MatMulConstBOnly": True})
            return
        if not calibration:
            raise ValueError("int8-static needs calibration inputs")

        class _Feeds(CalibrationDataReader):
            def __init__(self) -> None:
                self._feeds: Iterator[dict[str, np.ndarray]] = iter(calibration)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._feeds, None)

        # Activations uint8 (asymmetric: GELU outputs are mostly positive), weights int8 per channel: ONNX
        # Runtime's fastest combination on x86 CPUs. Scales are fixed here, once, so a text's vector does not
        # depend on the other texts in its batch. MatMul outputs stay float: they feed bias and residual adds,
        # not another int8 kernel.
        quantize_static(source, out_path, _Feeds(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=matmuls, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"], use_external_data_format=external,
                        extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]})


def int8_units(model: onnx.ModelProto) -> tuple[list[str], str | None]:
    """The weight MatMuls to quantize (a constant right operand and a computed left one) and the word-embedding
    lookup (None when the graph has none), by node name.

    MatMuls between two activations (DeBERTa's content-to-content, content-to-position, position-to-content
    and context products) stay fp32: both operands change per input, their outputs are summed and fed to a
    softmax, and per-tensor int8 error there is amplified.
    """
    weights = {init.name for init in model.graph.initializer}
    names: list[str] = []
    lookup = None
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in weights:
            names.append(node.name)
        elif node.op_type == "Gather" and node.input[0] in weights and node.input[1] == INPUT_IDS:
            lookup = node.name
    if not names:
        raise ExportError("found no weight MatMul to quantize in the graph; this is a bug in deberta-onnx for this "
                          "checkpoint: please report it.")
    return names, lookup


def _zero_padding(model: onnx.ModelProto, matmuls: Collection[str]) -> None:
    """Zeroes the padded positions of the MatMul inputs that dynamic quantization will scale per call.

    Dynamic quantization takes one scale per call from the whole input tensor, padded positions included, and
    what a network computes at padded positions is never read and may be anything: a trained model's padding
    can hold values far outside its real tokens' range, and then every real token of the batch loses its
    precision (on an outlier fixture: cosine 0.96 in batches against 0.9999 alone). Padded positions are
    masked out of attention and pooled over by nothing, so zeroing them leaves every real token's result as
    it was, and the scale then depends on real tokens only.
    """
    wanted = set(matmuls)
    shapes = {info.name: [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in model.graph.value_info if info.type.tensor_type.HasField("shape")}
    # Only MatMuls over the tokens ([rows, sequence, hidden]); a head's MatMuls after pooling ([rows, hidden]) or at
    # the gathered masked positions ([batch, masks, hidden]) have no padded positions to zero.
    targets = [node for node in model.graph.node if node.name in wanted and _per_token(shapes.get(node.input[0]))]
    if not targets:
        return
    mask = "deberta_onnx_token_mask"
    rank = next(len(i.type.tensor_type.shape.dim) for i in model.graph.input if i.name == ATTENTION_MASK)
    nodes = [helper.make_node("Cast", [ATTENTION_MASK], [f"{mask}_float"], name=f"{mask}_cast",
                              to=onnx.TensorProto.FLOAT)]
    if rank == 2:
        nodes.append(helper.make_node("Unsqueeze", [f"{mask}_float", f"{mask}_axes"], [mask], name=f"{mask}_unsqueeze"))
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{mask}_axes"))
    else:  # [batch, choices, sequence]: the encoder runs on [batch x choices, sequence] rows
        nodes += [
            helper.make_node("Shape", [ATTENTION_MASK], [f"{mask}_width"], name=f"{mask}_width", start=-1),
            helper.make_node("Concat", [f"{mask}_rows", f"{mask}_width", f"{mask}_one"], [f"{mask}_shape"],
                             name=f"{mask}_shape", axis=0),
            helper.make_node("Reshape", [f"{mask}_float", f"{mask}_shape"], [mask], name=f"{mask}_reshape"),
        ]
        model.graph.initializer.extend([numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{mask}_rows"),
                                        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{mask}_one")])
    masked: dict[str, str] = {}
    made_by = producers(model)
    after: dict[str, list[onnx.NodeProto]] = {}
    for node in targets:
        tensor = node.input[0]
        if tensor not in masked:
            masked[tensor] = f"{tensor}_real_tokens"
            producer = made_by.get(tensor)
            after.setdefault(producer.name if producer is not None else "", []).append(
                helper.make_node("Mul", [tensor, mask], [masked[tensor]], name=f"{tensor}_zero_padding"))
        node.input[0] = masked[tensor]
    order = nodes + after.pop("", [])
    for node in model.graph.node:
        order.append(node)
        order += after.pop(node.name, [])
    model.graph.ClearField("node")
    model.graph.node.extend(order)


def _per_token(dims: list[Any] | None) -> bool:
    """Whether a tensor of these dimensions (unknown: assumed so) holds one row per token."""
    return dims is None or (len(dims) == 3 and dims[1] == SEQUENCE_AXIS)


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


def _embedding_rows_int8(model: onnx.ModelProto) -> bool:
    """Stores the word-embedding table in int8 with one scale per row, and looks rows up before scaling them.

    ``Gather(table, ids)`` becomes ``Cast(Gather(table_int8, ids)) * Gather(row_scales, ids)``: only the rows
    looked up are turned back into floats (dequantizing the whole 128,100 x 768 table of deberta-v3-base at
    every call, as ONNX Runtime's QDQ graph does, cost more than the rest of a batch-1 call). One scale per row
    keeps a few very large rows, which trained checkpoints have ([SEP], punctuation), from costing every other
    row its precision, as one scale for the table would. Returns whether a table was found.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    for position, gather in enumerate(model.graph.node):
        if gather.op_type != "Gather" or gather.input[1] != INPUT_IDS or gather.input[0] not in initializers:
            continue
        if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
            continue
        table = numpy_helper.to_array(initializers[gather.input[0]]).astype(np.float32)
        peak = np.abs(table).max(axis=1, keepdims=True)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        quantized = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
        name, out = gather.input[0], gather.output[0]
        model.graph.initializer.extend([numpy_helper.from_array(quantized, f"{name}_int8_rows"),
                                        numpy_helper.from_array(scales, f"{name}_row_scales")])
        nodes = [
            helper.make_node("Gather", [f"{name}_int8_rows", INPUT_IDS], [f"{out}_int8"], name=gather.name),
            helper.make_node("Gather", [f"{name}_row_scales", INPUT_IDS], [f"{out}_scales"],
                             name=f"{gather.name}_row_scales"),
            helper.make_node("Cast", [f"{out}_int8"], [f"{out}_unscaled"], name=f"{gather.name}_cast",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}_unscaled", f"{out}_scales"], [out], name=f"{gather.name}_dequantize"),
        ]
        for offset, node in enumerate(nodes):
            model.graph.node.insert(position + 1 + offset, node)
        model.graph.node.remove(gather)
        prune(model)
        return True
    return False
