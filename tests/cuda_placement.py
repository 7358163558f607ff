"""Where ONNX Runtime's CUDA provider would place a graph's nodes, predicted on a machine without a GPU.

A re-implementation, in Python, of the three steps of ONNX Runtime's session initialisation that decide whether
a graph needs host-device copies (which make ``enable_cuda_graph`` fail at session creation, and cost a
synchronisation per copy otherwise). Read from ONNX Runtime's sources (microsoft/onnxruntime):

1. ``CUDAExecutionProvider::GetCapability`` (``core/providers/cuda/cuda_execution_provider.cc``): the CUDA provider
   claims every node it has a kernel for (op, domain, element types), as "tentative" nodes.
2. ``GetCpuPreferredNodes`` (``core/framework/fallback_cpu_capability.cc``): from the outputs a claimed kernel
   declares in host memory (``OutputMemoryType(OrtMemTypeCPU...)``: ``Shape``, ``Size``), it walks their
   consumers in topological order and moves a claimed node back to the CPU when every input is a small
   initializer (at most 100 elements), a graph input, or a host tensor that its CUDA kernel does *not* declare
   as a host input (``InputMemoryType(OrtMemTypeCPUInput, i)``), and no input is float16/bfloat16/float8. The
   outputs of a node moved back are host tensors in turn. Unclaimed nodes reached this way count as host nodes.
3. ``TransformerMemcpyImpl`` (``core/optimizer/transformer_memcpy.cc``), after partitioning: a ``MemcpyFromHost``
   wherever a host tensor (a CPU node's output, or a CUDA kernel's declared host output) feeds a CUDA input not
   declared on the host, or a graph input feeds both; a ``MemcpyToHost`` wherever a device tensor feeds a CPU node
   or a declared host input. Initializers never need one (they are duplicated per device).

``InferenceSession::Initialize`` (``core/session/inference_session.cc``) then refuses ``enable_cuda_graph`` when
any Memcpy node exists; CPU nodes alone are allowed.

What this does not model: opset-version ranges of the kernels (every kernel here is registered for the versions an
opset-18 export uses), ONNX Runtime's level-2 and later fusions (they run after partitioning and fuse nodes of one
provider, inheriting its placement), and provider options. ``CUDA_KERNELS`` lists only the kernels of ops these
graphs use, each checked against its registration; an op it does not know raises ``UnknownOpError``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

__all__ = ["CUDA_KERNELS", "CudaKernel", "HostRead", "Placement", "UnknownOpError", "element_types", "level1_graph",
           "predict_placement"]

T = TensorProto
# Element types, as the registrations name them (H float16, F float, D double, B bfloat16, ...).
_HFD = frozenset({T.FLOAT16, T.FLOAT, T.DOUBLE})
_HFDB = _HFD | {T.BFLOAT16}
_UZILHFDB = _HFDB | {T.UINT32, T.UINT64, T.INT32, T.INT64}
_NUMERIC = _UZILHFDB | {T.UINT8, T.UINT16, T.INT8, T.INT16}
_FIXED = _NUMERIC | {T.BOOL}
_REDUCE = frozenset({T.FLOAT, T.DOUBLE, T.FLOAT16, T.INT32, T.INT64, T.BFLOAT16})
# GetCpuPreferredNodes never moves a node with an input of these types to the CPU.
_GPU_ONLY_TYPES = frozenset({T.FLOAT16, T.BFLOAT16, T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ})
_SMALL_INITIALIZER = 100  # kSmallInitializerThreshold


@dataclass(frozen=True)
class CudaKernel:
    """One CUDA kernel registration, as far as placement cares.

    Attributes:
        types: element types the kernel is registered for, on the tensor ``typed`` names.
        typed: ``("input", i)`` or ``("output", i)``: the tensor whose type picks the kernel.
        cpu_inputs: inputs declared ``InputMemoryType(OrtMemTypeCPUInput, i)``.
        cpu_outputs: outputs declared in host memory (``OutputMemoryType(OrtMemTypeCPU...)``).
        output_type: how the first output's element type follows from the inputs, for graphs without type
            annotations: ``"same"`` (input 0), ``"input1"``, ``"bool"``, ``"int64"``, ``"to"`` (Cast's attribute).
    """

    types: frozenset[int]
    typed: tuple[str, int] = ("input", 0)
    cpu_inputs: frozenset[int] = frozenset()
    cpu_outputs: frozenset[int] = frozenset()
    output_type: str = "same"


def _k(types: Iterable[int], **kwargs: object) -> CudaKernel:
    for name in ("cpu_inputs", "cpu_outputs"):
        if name in kwargs:
            kwargs[name] = frozenset(kwargs[name])  # type: ignore[arg-type]
    return CudaKernel(frozenset(types), **kwargs)  # type: ignore[arg-type]


# (domain, op) -> kernel. Sources, under onnxruntime/core/providers/cuda/ unless said: math/unary_elementwise_ops.cc
# (Abs, Sign: all numeric; Neg; Ceil, Log, Sqrt, Erf: HFD), math/binary_elementwise_ops.cc (Add..Div, comparisons:
# UZILHFD and bfloat16; Pow: int32, int64, float, double, float16; And: bool), math/clip.cc (min/max on the host),
# generator/range.cc (start, limit, delta on the host), tensor/shape_op.cc (output on the host), tensor/reshape.cc,
# tensor/slice.cc, tensor/squeeze.cc, tensor/unsqueeze.cc, tensor/expand.cc, tensor/tile.cc (shape-like inputs on
# the host), reduction/reduction_ops.cc (axes on the host from opset 13/18), tensor/where.cc, tensor/cast_op.cc,
# generator/constant_of_shape.cc; contrib_ops/cuda/bert/skip_layer_norm.cc, contrib_ops/cuda/math/bias_gelu.cc,
# contrib_ops/cuda/activation/activations.cc (Gelu).
CUDA_KERNELS: dict[tuple[str, str], CudaKernel] = {
    ("", "Abs"): _k(_NUMERIC),
    ("", "Sign"): _k(_NUMERIC),
    ("", "Neg"): _k(_HFDB | {T.INT8, T.INT16, T.INT32, T.INT64}),
    ("", "Ceil"): _k(_HFDB),
    ("", "Floor"): _k(_HFDB),
    ("", "Log"): _k(_HFDB),
    ("", "Exp"): _k(_HFDB),
    ("", "Sqrt"): _k(_HFDB),
    ("", "Erf"): _k(_HFDB),
    ("", "Reciprocal"): _k(_HFDB),
    ("", "Tanh"): _k(_HFDB),
    ("", "Sigmoid"): _k(_HFDB),
    ("", "Relu"): _k(_HFDB),
    ("", "Add"): _k(_UZILHFDB),
    ("", "Sub"): _k(_UZILHFDB),
    ("", "Mul"): _k(_UZILHFDB),
    ("", "Div"): _k(_UZILHFDB),
    ("", "Max"): _k(_UZILHFDB),
    ("", "Min"): _k(_UZILHFDB),
    ("", "Pow"): _k({T.INT32, T.INT64, T.FLOAT, T.DOUBLE, T.FLOAT16}),
    ("", "Equal"): _k(_UZILHFDB | {T.BOOL}, output_type="bool"),
    ("", "Greater"): _k(_UZILHFDB, output_type="bool"),
    ("", "Less"): _k(_UZILHFDB, output_type="bool"),
    ("", "GreaterOrEqual"): _k(_UZILHFDB, output_type="bool"),
    ("", "LessOrEqual"): _k(_UZILHFDB, output_type="bool"),
    ("", "And"): _k({T.BOOL}, output_type="bool"),
    ("", "Or"): _k({T.BOOL}, output_type="bool"),
    ("", "Not"): _k({T.BOOL}, output_type="bool"),
    ("", "Where"): _k({T.UINT8, T.INT32, T.INT64, T.FLOAT, T.DOUBLE, T.FLOAT16, T.BFLOAT16}, typed=("input", 1),
                      output_type="input1"),
    ("", "Clip"): _k({T.FLOAT, T.DOUBLE, T.INT8, T.UINT8, T.INT64, T.UINT64}, cpu_inputs={1, 2}),
    ("", "Cast"): _k(_FIXED, output_type="to"),
    ("", "Range"): _k({T.INT16, T.INT32, T.INT64, T.FLOAT, T.DOUBLE}, cpu_inputs={0, 1, 2}),
    ("", "Shape"): _k(_FIXED, cpu_outputs={0}, output_type="int64"),
    ("", "Size"): _k(_FIXED, cpu_outputs={0}, output_type="int64"),
    ("", "ConstantOfShape"): _k({T.INT64}, cpu_inputs={0}, output_type="value"),
    ("", "Reshape"): _k(_FIXED, cpu_inputs={1}),
    ("", "Expand"): _k(_FIXED, cpu_inputs={1}),
    ("", "Tile"): _k(_FIXED, cpu_inputs={1}),
    ("", "Slice"): _k(_FIXED, cpu_inputs={1, 2, 3, 4}),
    ("", "Squeeze"): _k(_FIXED, cpu_inputs={1}),
    ("", "Unsqueeze"): _k(_FIXED, cpu_inputs={1}),
    ("", "Split"): _k(_FIXED, cpu_inputs={1}),
    ("", "Concat"): _k(_FIXED),
    ("", "Transpose"): _k(_FIXED),
    ("", "Identity"): _k(_FIXED),
    ("", "Gather"): _k(_FIXED),
    ("", "GatherElements"): _k(_FIXED),
    ("", "MatMul"): _k(_HFDB),
    ("", "Gemm"): _k(_HFDB),
    ("", "Conv"): _k(_HFD),
    ("", "Softmax"): _k(_HFDB),
    ("", "LayerNormalization"): _k(_HFDB),
    ("", "ReduceSum"): _k(_REDUCE, cpu_inputs={1}),
    ("", "ReduceMean"): _k(_REDUCE, cpu_inputs={1}),
    ("", "ReduceMax"): _k(_REDUCE | {T.INT8, T.UINT8}, cpu_inputs={1}),
    ("", "ReduceMin"): _k(_REDUCE | {T.INT8, T.UINT8}, cpu_inputs={1}),
    ("", "ReduceL2"): _k(_REDUCE, cpu_inputs={1}),
    ("com.microsoft", "SkipLayerNormalization"): _k(_HFDB - {T.DOUBLE}),
    ("com.microsoft", "BiasGelu"): _k(_HFDB),
    ("com.microsoft", "Gelu"): _k(_HFDB),
    ("com.microsoft", "FastGelu"): _k(_HFDB),
    ("com.microsoft", "FusedMatMul"): _k(_HFDB),
}


class UnknownOpError(KeyError):
    """The graph has an op whose CUDA kernel ``CUDA_KERNELS`` does not describe."""


@dataclass(frozen=True)
class HostRead:
    """A tensor that crosses between host and device: ONNX Runtime inserts a Memcpy node for it."""

    tensor: str
    copy: str  # "MemcpyFromHost" or "MemcpyToHost"
    producer: str  # "graph input" or "OP (node name) on cpu/cuda"
    consumers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.copy} for {self.tensor!r}: produced by {self.producer}, read by {', '.join(self.consumers)}"


@dataclass
class Placement:
    """The predicted placement: node names on each provider, and the copies between them."""

    cuda: list[str] = field(default_factory=list)
    cpu: list[str] = field(default_factory=list)
    cpu_preferred: list[str] = field(default_factory=list)  # claimed by CUDA, moved back by GetCpuPreferredNodes
    copies: list[HostRead] = field(default_factory=list)
    ops: dict[str, str] = field(default_factory=dict)  # node name -> op type
    outputs: dict[str, list[str]] = field(default_factory=dict)  # node name -> its outputs

    def describe(self, names: Iterable[str]) -> str:
        return ", ".join(f"{self.ops[name]} ({name})" for name in names)


def element_types(model: onnx.ModelProto, known: dict[str, int] | None = None) -> dict[str, int]:
    """Every tensor's element type: ``known`` first, then the graph's annotations, then the kernels' rules."""
    graph = model.graph
    types: dict[str, int] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    types.update(known or {})
    # Fill what the annotations lack (contrib ops are not in onnx's shape inference) from the kernels' rules.
    for node in graph.node:
        if not node.output or node.output[0] in types:
            continue
        kernel = CUDA_KERNELS.get((node.domain, node.op_type))
        rule = kernel.output_type if kernel is not None else "same"
        source = node.input[1] if rule == "input1" and len(node.input) > 1 else (node.input[0] if node.input else "")
        if rule == "bool":
            types[node.output[0]] = T.BOOL
        elif rule == "int64":
            types[node.output[0]] = T.INT64
        elif rule == "to":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
        elif rule == "value":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            types[node.output[0]] = value.data_type if value is not None else T.FLOAT
        elif source in types:
            types[node.output[0]] = types[source]
    return types


def _claims(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    kernel = CUDA_KERNELS.get(key)
    if kernel is None:
        raise UnknownOpError(
            f"{key[0] or 'ai.onnx'}.{key[1]} (node {node.name}) has no entry in CUDA_KERNELS; read its CUDA kernel "
            "registration in onnxruntime (which element types, which inputs/outputs in host memory) and add it"
        )
    if node.op_type == "Cast" and next(a.i for a in node.attribute if a.name == "to") == T.STRING:
        return False  # CastNeedFallbackToCPU
    kind, index = kernel.typed
    names = node.input if kind == "input" else node.output
    name = names[index] if index < len(names) else ""
    return types.get(name) in kernel.types


def predict_placement(model: onnx.ModelProto, types: dict[str, int] | None = None) -> Placement:
    """Predicts the CUDA provider's placement of ``model``'s nodes and the Memcpy nodes it would need.

    Pass the graph ONNX Runtime partitions, as ``level1_graph`` gives it; ``types`` overrides element types.

    Raises:
        UnknownOpError: an op ``CUDA_KERNELS`` does not describe.
    """
    graph = model.graph
    nodes = list(graph.node)
    key = {id(node): node.name or f"#{i}" for i, node in enumerate(nodes)}
    types = element_types(model, types)
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {info.name for info in graph.input if info.name not in initializers}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)
    order = {i: i for i in range(len(nodes))}  # the file's node order is topological (ONNX requires it)

    def kernel(node: onnx.NodeProto) -> CudaKernel:
        return CUDA_KERNELS[(node.domain if node.domain != "ai.onnx" else "", node.op_type)]

    tentative = {i for i, node in enumerate(nodes) if _claims(node, types)}

    def small_initializer(name: str) -> bool:
        init = initializers.get(name)
        if init is None:
            return False
        size = 1
        for dim in init.dims:
            size *= dim
        return size <= _SMALL_INITIALIZER

    # GetCpuPreferredNodes.
    host_tensors: set[str] = set()
    candidates: list[int] = []
    for i in sorted(tentative):
        for j, name in enumerate(nodes[i].output):
            if name and j in kernel(nodes[i]).cpu_outputs:
                host_tensors.add(name)
                for c in consumers.get(name, []):
                    heapq.heappush(candidates, order[c])
    visited: set[int] = set()
    preferred: set[int] = set()
    while candidates:
        i = heapq.heappop(candidates)
        if i in visited:
            continue
        visited.add(i)
        node = nodes[i]
        if i not in tentative:
            # No CUDA kernel: it runs on the CPU, so its outputs are host tensors.
            host_tensors.update(name for name in node.output if name)
            for name in node.output:
                for c in consumers.get(name, []):
                    heapq.heappush(candidates, order[c])
            continue
        place_on_cpu = True
        for j, name in enumerate(node.input):
            if types.get(name) in _GPU_ONLY_TYPES:
                place_on_cpu = False
                break
            if name and (small_initializer(name) or name in graph_inputs):
                continue
            if name not in host_tensors or j in kernel(node).cpu_inputs:
                place_on_cpu = False
                break
        if place_on_cpu:
            preferred.add(i)
            host_tensors.update(name for name in node.output if name)
            for name in node.output:
                for c in consumers.get(name, []):
                    heapq.heappush(candidates, order[c])

    on_cuda = tentative - preferred
    placement = Placement(ops={key[id(n)]: n.op_type for n in nodes},
                          outputs={key[id(n)]: [name for name in n.output if name] for n in nodes})
    placement.cuda = [key[id(nodes[i])] for i in sorted(on_cuda)]
    placement.cpu = [key[id(nodes[i])] for i in range(len(nodes)) if i not in on_cuda]
    placement.cpu_preferred = [key[id(nodes[i])] for i in sorted(preferred)]

    # TransformerMemcpyImpl.
    gpu_in: dict[str, list[str]] = {}
    cpu_in: dict[str, list[str]] = {}
    produced_on: dict[str, tuple[str, bool]] = {}  # tensor -> (producer, lives on the host)
    for i, node in enumerate(nodes):
        where = "cuda" if i in on_cuda else "cpu"
        label = f"{node.op_type} ({key[id(node)]}) on {where}"
        for j, name in enumerate(node.input):
            if not name or name in initializers:
                continue
            host = i not in on_cuda or j in kernel(node).cpu_inputs
            (cpu_in if host else gpu_in).setdefault(name, []).append(label)
        for j, name in enumerate(node.output):
            if name:
                produced_on[name] = (label, i not in on_cuda or j in kernel(node).cpu_outputs)
    for name in sorted(graph_inputs):
        if name in gpu_in and name in cpu_in:
            placement.copies.append(HostRead(name, "MemcpyFromHost", "graph input", tuple(gpu_in[name])))
    for name, (producer, host) in produced_on.items():
        if host and name in gpu_in:
            placement.copies.append(HostRead(name, "MemcpyFromHost", producer, tuple(gpu_in[name])))
        if not host and name in cpu_in:
            placement.copies.append(HostRead(name, "MemcpyToHost", producer, tuple(cpu_in[name])))
    return placement


def level1_graph(path: Path, scratch: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph at ``path`` as the CUDA provider partitions it, after ONNX Runtime's level-1 optimisations
    (constant folding, common subexpressions, eliminations; ``TransformGraph`` runs them before partitioning),
    with every tensor's element type.

    The optimisations are ONNX Runtime's own, from a CPU session with ``ORT_ENABLE_BASIC`` that writes the
    optimised graph (``optimized_model_filepath``). A float16 graph cannot go through that session as it is: the
    CPU provider, lacking float16 kernels, rewrites it with casts to float32 after partitioning
    (``InsertCastTransformer``), so its written graph is not what the CUDA provider sees. A float16 graph therefore
    goes through as a float32 twin (float16 tensors and initializers, and casts to float16, relabelled float32;
    Cast elimination off so that those casts survive), and the float16 types are put back by name afterwards.
    """
    model = onnx.load(str(path))
    original = element_types(model)
    fp16 = {name for name, kind in original.items() if kind == T.FLOAT16}
    relabelled: set[str] = set()
    if fp16:
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"placement_node_{i}"
            for attribute in node.attribute:
                if node.op_type == "Cast" and attribute.name == "to" and attribute.i == T.FLOAT16:
                    attribute.i = T.FLOAT
                    relabelled.add(node.name)
                elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == T.FLOAT16:
                    attribute.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name))
        for index, init in enumerate(model.graph.initializer):
            if init.data_type == T.FLOAT16:
                model.graph.initializer[index].CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
        for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            if info.type.tensor_type.elem_type == T.FLOAT16:
                info.type.tensor_type.elem_type = T.FLOAT
    scratch.mkdir(parents=True, exist_ok=True)
    source, optimised = scratch / "graph.onnx", scratch / "graph.level1.onnx"
    onnx.save(model, str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["CastElimination"] if fp16 else None)
    result = onnx.load(str(optimised))
    names = {node.name for node in result.graph.node}
    lost = relabelled - names
    if lost:
        raise AssertionError(f"level-1 optimisation removed casts to float16 {sorted(lost)}; the twin is not faithful")
    for node in result.graph.node:
        if node.name in relabelled:
            next(a for a in node.attribute if a.name == "to").i = T.FLOAT16
    # Names the file had keep their type; tensors the optimiser made get theirs from the kernels' rules.
    kept = [info for info in result.graph.value_info if info.name in original]
    result.graph.ClearField("value_info")
    result.graph.value_info.extend(kept)
    return result, element_types(result, original)
