"""Lower-precision graphs derived from the exported fp32 graph: fp16, int8-dynamic and int8-static (QDQ).

Every derived graph starts from the fp32 graph with its constant subgraphs folded in fp32 (``fold_constants``):
DeBERTa projects its relative-position embeddings through LayerNorm and the key/query weights, a computation
that depends on no input. ONNX Runtime folds it at session load for fp32, but cannot fold fp16 Gemm/MatMul on
CPU, and quantizing it would add a second copy of the shared key/query weights; folded once at export, it is
exact and computed by no session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from deberta_onnx.runtime.contract import INPUT_IDS

from ._errors import ExportError
from ._quiet import quiet_quantization

__all__ = ["RECIPES", "Recipe", "build_variant", "fold_constants", "prepare_base"]

# Protobuf cannot serialise a model over 2 GB; larger graphs keep their weights in FILE.data beside them.
_EXTERNAL_DATA_BYTES = 1_800_000_000
_PROTOBUF_LIMIT = 2**31 - 1
# Constant nodes that only copy or broadcast are left to the session: folding them would store a larger tensor.
_NO_FOLD = {"Expand", "Tile", "ConstantOfShape", "Range"}
# Kept in fp32 in the fp16 graph: normalisation statistics, softmax, and reductions (ReduceMean, Pow and Sqrt
# are DeBERTa v1's hand-written LayerNorm). SkipLayerNormalization is the export's fused residual add + LayerNorm:
# keeping it fp32 keeps the residual stream fp32 too.
_FP16_KEEP_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt")
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Where", "Neg", "Clip")
_INT8_MATMUL_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat"}


@dataclass(frozen=True)
class Recipe:
    """One way to build a precision. A precision's recipes run from the most compact to the safest; the
    quality gate's fallback tries them in that order.

    Attributes:
        precision: the variant it builds (``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``).
        name: short name recorded in the manifest.
        description: what stays in which precision, for the manifest and the terminal.
        int8_embeddings: int8: store the word-embedding table in int8 (most of the file for DeBERTa-v3).
        int8_ffn_output: int8: quantize the feed-forward down-projections (where DeBERTa's activation
            outliers live).
        fp16_elementwise: fp16: run elementwise ops (bias and residual adds, GELU, scaling) in fp16 too.
    """

    precision: str
    name: str
    description: str
    int8_embeddings: bool = True
    int8_ffn_output: bool = True
    fp16_elementwise: bool = True


_INT8_RECIPES: tuple[tuple[str, str, dict[str, bool]], ...] = (
    ("all", "every weight MatMul and the word embeddings in int8", {}),
    ("embeddings-fp32", "weight MatMuls in int8, word embeddings in fp32", {"int8_embeddings": False}),
    ("ffn-output-fp32", "weight MatMuls in int8 except the feed-forward down-projections; embeddings in fp32",
     {"int8_embeddings": False, "int8_ffn_output": False}),
)

RECIPES: dict[str, tuple[Recipe, ...]] = {
    "fp16": (
        Recipe("fp16", "standard", "fp16 weights and activations; LayerNorm, softmax, reductions, relative-position "
                                   "indices and pooling in fp32; fp32 inputs and output"),
        Recipe("fp16", "elementwise-fp32", "fp16 weights, MatMuls and embeddings; every other op in fp32",
               fp16_elementwise=False),
    ),
    "int8-dynamic": tuple(Recipe("int8-dynamic", name, text, **kw) for name, text, kw in _INT8_RECIPES),
    "int8-static": tuple(Recipe("int8-static", name, text, **kw) for name, text, kw in _INT8_RECIPES),
}


def prepare_base(model_path: Path, out_path: Path) -> Path:
    """Loads the fp32 graph, folds its constant subgraphs in fp32 and saves the result to ``out_path``."""
    model = onnx.load(str(model_path))
    # Recipes pick nodes by name; the exporter names them all, but a name must never be empty.
    taken = {node.name for node in model.graph.node}
    for number, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{number}_{k}" for k in range(len(taken) + 1)
                             if f"{node.op_type}_{number}_{k}" not in taken)
            taken.add(node.name)
    _save(fold_constants(model), out_path)
    return out_path


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replaces every node computed from initializers alone by its value, evaluated in fp32 by ONNX Runtime.

    Nodes that only broadcast (``Expand``, ``Tile``, ...) are left alone. Modifies and returns ``model``.
    """
    graph = model.graph
    constant = {init.name for init in graph.initializer}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in _NO_FOLD or any(attr.type == onnx.AttributeProto.GRAPH for attr in node.attribute):
            continue
        if (node.input or node.op_type == "Constant") and all(not name or name in constant for name in node.input):
            folded.append(node)
            constant.update(node.output)
    if not folded:
        return model
    folded_ids = {id(node) for node in folded}
    kept = [node for node in graph.node if id(node) not in folded_ids]
    used = {name for node in kept for name in node.input} | {out.name for out in graph.output}
    frontier = sorted({name for node in folded for name in node.output if name in used})
    initializers = {init.name: init for init in graph.initializer}
    needed = {name for node in folded for name in node.input if name in initializers}
    values = _evaluate(model, folded, [initializers[name] for name in sorted(needed)], frontier)
    graph.ClearField("node")
    graph.node.extend(kept)
    still_used = {name for node in kept for name in node.input} | {out.name for out in graph.output}
    keep_inits = [init for init in initializers.values() if init.name in still_used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep_inits + [numpy_helper.from_array(values[name], name) for name in frontier])
    value_info = [info for info in graph.value_info if info.name not in values]
    graph.ClearField("value_info")
    graph.value_info.extend(value_info)
    return model


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
              outputs: list[str]) -> dict[str, np.ndarray]:
    sub = helper.make_graph(nodes, "constants", [], [], initializers)
    sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    types = {info.name: info.type.tensor_type.elem_type
             for info in onnx.shape_inference.infer_shapes(sub_model).graph.value_info}
    missing = [name for name in outputs if not types.get(name)]
    if missing:
        raise ExportError(f"cannot infer the type of the constant tensor(s) {missing[:3]} while folding the graph; "
                          "this is a bug in deberta-onnx for this checkpoint: please report it.")
    sub_model.graph.output.extend(helper.make_tensor_value_info(name, types[name], None) for name in outputs)
    session = ort.InferenceSession(sub_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(outputs, session.run(outputs, {})))


def build_variant(
    recipe: Recipe,
    base_path: Path,
    out_path: Path,
    *,
    calibration: Sequence[dict[str, np.ndarray]] = (),
) -> dict[str, Any]:
    """Builds ``recipe``'s graph from the folded fp32 graph at ``base_path`` and writes it to ``out_path``.

    Args:
        recipe: what to build (see ``RECIPES``).
        base_path: the fp32 graph after ``prepare_base``.
        out_path: where to write the new graph (``FILE.data`` beside it when over 2 GB).
        calibration: int8-static only: the inputs (one feed per text) whose activation ranges fix the scales.

    Returns:
        A summary of the graph's nodes by precision, for the manifest.
    """
    if recipe.precision == "fp16":
        model = onnx.load(str(base_path))
        converted, kept = _to_fp16(model, recipe)
        _save(converted, out_path)
        return {"fp32_nodes": kept, **_matmul_summary(converted)}
    if recipe.precision not in ("int8-dynamic", "int8-static"):
        raise ValueError(f"no recipe builds precision {recipe.precision!r}")
    model = onnx.load(str(base_path), load_external_data=False)
    nodes = _int8_nodes(model, recipe)
    external = base_path.stat().st_size > _EXTERNAL_DATA_BYTES
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
            _save(model, out_path)
    return _matmul_summary(onnx.load(str(out_path), load_external_data=False))


def _float_for_float_consumers(model: onnx.ModelProto, quantized: set[str]) -> None:
    """Gives every node that is not quantized its float input back.

    ONNX Runtime's QDQ quantizer routes every reader of a quantized activation through the
    Quantize/Dequantize pair, so a LayerNorm output read by a MatMul (int8) and by the residual add beside it
    would reach the add rounded to 8 bits: the residual stream itself would be quantized, layer after layer.
    On deberta-v3-xsmall (random weights) that costs the held-out minimum cosine 0.9944 against 0.9998 without.
    """
    producers = _producers(model)
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dequantize = producers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producers.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                node.input[i] = quantize.input[0]
    _prune(model)


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


def _prune(model: onnx.ModelProto) -> None:
    """Removes nodes whose outputs nothing reads, until none is left, then initializers nothing reads."""
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        live = [node for node in graph.node if any(name in used for name in node.output)]
        if len(live) == len(graph.node):
            break
        graph.ClearField("node")
        graph.node.extend(live)
    initializers = [init for init in graph.initializer if init.name in used]
    if len(initializers) < len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(initializers)


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
            rows, columns = (list(weights[node.input[1]].dims) + [0, 0])[:2]
            if recipe.int8_ffn_output or rows <= columns:
                names.append(node.name)
        elif (node.op_type == "Gather" and recipe.int8_embeddings and node.input[0] in weights
              and node.input[1] == INPUT_IDS):
            names.append(node.name)
    if not names:
        raise ExportError("found no weight MatMul to quantize in the graph; this is a bug in deberta-onnx for this "
                          "checkpoint: please report it.")
    return names


def _to_fp16(model: onnx.ModelProto, recipe: Recipe) -> tuple[onnx.ModelProto, dict[str, int]]:
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
    ops = {*DEFAULT_OP_BLOCK_LIST, *_FP16_KEEP_OPS, *(() if recipe.fp16_elementwise else _ELEMENTWISE)}
    names = _index_nodes(model) | _pooling_nodes(model)
    types = {info.name: info.type.tensor_type.elem_type for info in model.graph.value_info}
    kept = Counter(node.op_type for node in model.graph.node
                   if (node.op_type in ops or node.name in names) and node.op_type not in ("Shape", "Size")
                   and types.get(node.output[0]) == TensorProto.FLOAT)
    with quiet_quantization():
        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                             op_block_list=sorted(ops), node_block_list=sorted(names))
    _drop_cast_pairs(converted)
    return converted, dict(sorted(kept.items()))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output}


def _ancestors(model: onnx.ModelProto, tensors: Iterable[str]) -> set[str]:
    """Names of the nodes that ``tensors`` are computed from (transitively)."""
    producers = _producers(model)
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def _index_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes that compute gather indices: DeBERTa's relative-position buckets, computed with a float log.
    In fp16 a bucket could round to its neighbour, so they stay fp32."""
    gathers = [node.input[1] for node in model.graph.node if node.op_type in ("Gather", "GatherElements", "GatherND")]
    return _ancestors(model, gathers)


def _pooling_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes after the encoder's last MatMul on the way to the output: the last residual add and LayerNorm and
    the masked-mean pooling, whose sum over up to 512 tokens could overflow fp16."""
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    encoder = _ancestors(model, [name for node in matmuls for name in node.input]) | {node.name for node in matmuls}
    return _ancestors(model, [out.name for out in model.graph.output]) - encoder


def _drop_cast_pairs(model: onnx.ModelProto) -> None:
    """Between two fp32 nodes the converter puts a Cast to fp16 and one back; bypass such pairs so the value
    stays fp32 (only pairs the converter made, recognised by their names, are touched)."""
    producers = _producers(model)
    rename: dict[str, str] = {}
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "Cast" and node.name.endswith("_cast_to_fp32_node"):
            parent = producers.get(node.input[0])
            if parent is not None and parent.op_type == "Cast" and parent.name.endswith("_cast_to_fp16_node"):
                rename[node.output[0]] = parent.input[0]
                dropped.add(node.name)
    for node in model.graph.node:
        if node.name not in dropped:
            for i, name in enumerate(node.input):
                node.input[i] = rename.get(name, name)
    # The bypassed pairs (and any Cast to fp16 that only they read) are dead now.
    _prune(model)


def _matmul_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts MatMuls by the precision they run in and by their right operand (a stored weight, or an
    activation), and says how the word-embedding table is stored."""
    producers = _producers(model)
    initializers = {init.name: init for init in model.graph.initializer}
    types = {info.name: info.type.tensor_type.elem_type for info in model.graph.value_info}

    def dequantized(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def weight(name: str) -> bool:
        node = producers.get(name)
        return name in initializers or (node is not None and node.op_type == "DequantizeLinear"
                                        and node.input[0] in initializers)

    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in _INT8_MATMUL_OPS or (node.op_type == "MatMul" and any(map(dequantized, node.input))):
            kind = "int8"
        elif node.op_type == "MatMul":
            kind = "fp16" if types.get(node.output[0]) == TensorProto.FLOAT16 else "fp32"
        else:
            continue
        counts[f"{kind}_{'weight' if weight(node.input[1]) else 'activation'}"] += 1
    embeddings = "fp32"
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == INPUT_IDS:
            table = initializers.get(node.input[0])
            if dequantized(node.input[0]) or (table is not None and table.data_type in (TensorProto.INT8,
                                                                                         TensorProto.UINT8)):
                embeddings = "int8"
            elif table is not None and table.data_type == TensorProto.FLOAT16:
                embeddings = "fp16"
    return {"matmuls": dict(sorted(counts.items())), "embeddings": embeddings}


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > _EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data")
    else:
        onnx.save(model, str(path))
