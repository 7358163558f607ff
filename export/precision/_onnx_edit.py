"""ONNX graph surgery shared by the lower precisions: constant folding, producers and ancestors of tensors,
pruning dead nodes, saving (external data over 2 GB), and the count of MatMuls by precision for the manifest.

Every derived graph starts from the fp32 graph with its constant subgraphs folded in fp32 (``prepare_base``):
DeBERTa projects its relative-position embeddings through LayerNorm and the key/query weights, a computation
that depends on no input. ONNX Runtime folds it at session load for fp32, but cannot fold fp16 Gemm/MatMul on
CPU, and quantizing it would add a second copy of the shared key/query weights; folded once at export, it is
exact and computed by no session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from deberta_onnx.runtime.contract import INPUT_IDS

from .._errors import ExportError

__all__ = [
    "EXTERNAL_DATA_BYTES",
    "ancestors",
    "fold_constants",
    "matmul_summary",
    "prepare_base",
    "producers",
    "prune",
    "save",
]

# Protobuf cannot serialise a model over 2 GB; larger graphs keep their weights in FILE.data beside them.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Constant nodes that only copy or broadcast are left to the session: folding them would store a larger tensor.
_NO_FOLD = {"Expand", "Tile", "ConstantOfShape", "Range"}
_INT8_MATMUL_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat"}


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
    save(fold_constants(model), out_path)
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


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that computes it."""
    return {name: node for node in model.graph.node for name in node.output}


def ancestors(model: onnx.ModelProto, tensors: Iterable[str]) -> set[str]:
    """Names of the nodes that ``tensors`` are computed from (transitively)."""
    made_by = producers(model)
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        node = made_by.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def prune(model: onnx.ModelProto) -> None:
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


def save(model: onnx.ModelProto, path: Path) -> None:
    """Saves ``model`` to ``path``, with its weights in ``FILE.data`` beside it when over protobuf's limit."""
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data")
    else:
        onnx.save(model, str(path))


def matmul_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts MatMuls by the precision they run in and by their right operand (a stored weight, or an
    activation), and says how the word-embedding table is stored."""
    made_by = producers(model)
    initializers = {init.name: init for init in model.graph.initializer}
    types = {info.name: info.type.tensor_type.elem_type for info in model.graph.value_info}

    def dequantized(name: str) -> bool:
        node = made_by.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def weight(name: str) -> bool:
        node = made_by.get(name)
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
