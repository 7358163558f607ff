"""Where the CUDA provider would place each exported graph's nodes, predicted on the CPU (``cuda_placement``), and
that no CUDA node would read a host tensor (which needs a Memcpy node, and makes ONNX Runtime refuse CUDA graphs);
marked ``gpu``, the prediction against the real CUDA provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deberta_onnx.export import RECIPES, ExportConfig, export_model
from deberta_onnx.export.precision import build_variant, prepare_base

from .cuda_placement import UnknownOpError, level1_graph, predict_placement

T = TensorProto


def _int(name: str, value: int | list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.int64), name)


def _graph(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           initializers: list[onnx.TensorProto], output_type: int = T.FLOAT) -> onnx.ModelProto:
    declared = [helper.make_tensor_value_info(name, output_type, None) for name in outputs]
    graph = helper.make_graph(nodes, "g", inputs, declared, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _distances(fixed: bool) -> onnx.ModelProto:
    """The relative-position distances of a sequence of length S (``x``'s second dimension), built as the export
    built them before (``S - arange(2 S)``) or as it does now (``arange(S, -S, -1)``)."""
    x = helper.make_tensor_value_info("x", T.FLOAT, ["B", "S"])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["size"], axis=0)]
    if fixed:
        nodes += [helper.make_node("Neg", ["size"], ["minus_size"]),
                  helper.make_node("Range", ["size", "minus_size", "minus_one"], ["distances"])]
    else:
        nodes += [helper.make_node("Mul", ["size", "two"], ["twice"]),
                  helper.make_node("Range", ["zero", "twice", "one"], ["columns"]),
                  helper.make_node("Sub", ["size", "columns"], ["distances"])]
    nodes.append(helper.make_node("Cast", ["distances"], ["out"], to=T.FLOAT))
    constants = [_int("zero", 0), _int("one", 1), _int("two", 2), _int("minus_one", -1)]
    return _graph(nodes, [x], ["out"], constants)


# ------------------------------------------------------------------------------ the rule on hand-built graphs


def test_a_host_scalar_subtracted_from_a_range_needs_a_copy_and_one_range_does_not() -> None:
    old = predict_placement(_distances(fixed=False))
    # Gather and Mul read only the shape: moved to the CPU. Range takes its bounds on the host (a CUDA kernel
    # that declares them so), writes on the device; Sub then reads the host scalar: a MemcpyFromHost.
    assert {old.ops[n] for n in old.cpu} == {"Gather", "Mul"}
    assert [(c.tensor, c.copy) for c in old.copies] == [("size", "MemcpyFromHost")]
    assert "Sub" in old.copies[0].consumers[0] and "on cuda" in old.copies[0].consumers[0]
    new = predict_placement(_distances(fixed=True))
    assert new.copies == [] and {new.ops[n] for n in new.cpu} == {"Gather", "Neg"}
    assert {new.ops[n] for n in new.cuda} == {"Shape", "Range", "Cast"}


def test_a_device_tensor_read_as_a_shape_and_a_graph_input_read_on_both_sides_need_copies() -> None:
    x = helper.make_tensor_value_info("x", T.FLOAT, ["B", "S"])
    dims = helper.make_tensor_value_info("dims", T.INT64, [2])
    nodes = [helper.make_node("Abs", ["dims"], ["device_dims"]),  # fed by a graph input only: stays on CUDA
             helper.make_node("Reshape", ["x", "device_dims"], ["out"]),  # reads its shape on the host
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Add", ["shape", "dims"], ["host_sum"]),  # host values and a graph input: CPU
             helper.make_node("Cast", ["host_sum"], ["out2"], to=T.FLOAT)]  # host values only: CPU as well
    placement = predict_placement(_graph(nodes, [x, dims], ["out", "out2"], []))
    copies = {(c.tensor, c.copy) for c in placement.copies}
    assert copies == {("device_dims", "MemcpyToHost"), ("dims", "MemcpyFromHost")}
    assert {placement.ops[n] for n in placement.cpu} == {"Add", "Cast"}


def test_a_float16_input_keeps_a_node_on_cuda() -> None:
    x = helper.make_tensor_value_info("x", T.FLOAT, ["B", "S"])
    for kind, copies in ((T.FLOAT, 0), (T.FLOAT16, 1)):
        nodes = [helper.make_node("Shape", ["x"], ["shape"]),
                 helper.make_node("Cast", ["shape"], ["cast"], to=kind),
                 helper.make_node("Mul", ["cast", "scale"], ["out"])]
        scale = numpy_helper.from_array(np.array(2, dtype=np.float16 if kind == T.FLOAT16 else np.float32), "scale")
        placement = predict_placement(_graph(nodes, [x], ["out"], [scale], output_type=kind))
        mul = next(name for name, op in placement.ops.items() if op == "Mul")
        # fp32: the Cast and the Mul read host values only and move to the CPU. fp16: GetCpuPreferredNodes never
        # moves a node with a float16 input, so the Mul stays on CUDA and reads the Cast's host output.
        assert (mul in placement.cuda) == (kind == T.FLOAT16) and len(placement.copies) == copies


def test_an_op_without_a_described_kernel_is_refused() -> None:
    x = helper.make_tensor_value_info("x", T.FLOAT, ["N", "N"])
    model = _graph([helper.make_node("Einsum", ["x", "x"], ["out"], equation="ij,jk->ik")], [x], ["out"], [])
    with pytest.raises(UnknownOpError, match=r"ai\.onnx\.Einsum .* add it"):
        predict_placement(model)


# ------------------------------------------------------------------------------------- the exported graphs


def _fp16(folder: Path, recipe: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = prepare_base(folder / "model.onnx", out / "folded.onnx")
    build_variant(next(r for r in RECIPES["fp16"] if r.name == recipe), base, out / "model.fp16.onnx")
    return out / "model.fp16.onnx"


def _assert_no_host_reads(path: Path, scratch: Path) -> None:
    model, types = level1_graph(path, scratch)
    placement = predict_placement(model, types)
    assert not placement.copies, "\n".join(str(copy) for copy in placement.copies)
    # What stays on the CPU is shape arithmetic that the CUDA provider itself hands back (every output int64).
    assert set(placement.cpu) == set(placement.cpu_preferred), placement.describe(set(placement.cpu) -
                                                                                  set(placement.cpu_preferred))
    assert all(types[out] == T.INT64 for name in placement.cpu for out in placement.outputs[name]), \
        placement.describe(placement.cpu)
    # Not vacuous: the bulk runs on CUDA (on the tiny 2-layer graphs 164 to 185 nodes, against 23 or 24 of shape
    # arithmetic, a share that falls as layers are added).
    assert len(placement.cuda) > 5 * len(placement.cpu)


@pytest.mark.slow
def test_exported_graphs_read_no_host_tensor_on_cuda(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """fp32 and both fp16 recipes of every tiny configuration (shared and separate position keys, v2's conv)."""
    _, folder = exported
    _assert_no_host_reads(folder / "model.onnx", tmp_path / "fp32")
    for recipe in ("standard", "cuda"):
        path = _fp16(folder, recipe, tmp_path / recipe)
        _, types = level1_graph(path, tmp_path / f"{recipe}-level1")
        assert T.FLOAT16 in set(types.values())  # the float16 types survived the level-1 pass
        _assert_no_host_reads(path, tmp_path / f"{recipe}-check")


@pytest.mark.slow
def test_pooling_variants_read_no_host_tensor_on_cuda(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ExportConfig(precisions=("fp16",), validate=False, quiet=True, pooling="max", normalize=True,
                          token_embeddings=True)
    folder = export_model(tiny_checkpoint, tmp_path / "model", config).out_dir
    for name in ("model.onnx", "model.fp16.onnx"):
        _assert_no_host_reads(folder / name, tmp_path / name)


@pytest.mark.parametrize("task", ["nli", "ner", "reranker"])
def test_classifier_graphs_read_no_host_tensor_on_cuda(task: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    _, folder = request.getfixturevalue(task)
    _assert_no_host_reads(folder / "model.onnx", tmp_path)


# ------------------------------------------------------------------------------------------- on the GPU


def _memcpy_nodes(path: Path, scratch: Path) -> int:
    """Memcpy nodes in the graph a real CUDA session makes of ``path`` (level-1 optimisations, as predicted)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(scratch / f"{path.stem}.cuda.onnx")
    ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    saved = onnx.load(options.optimized_model_filepath)
    return sum(node.op_type in ("MemcpyFromHost", "MemcpyToHost") for node in saved.graph.node)


@pytest.mark.gpu
def test_prediction_matches_the_cuda_provider(tiny_model: Path, tmp_path: Path) -> None:
    from deberta_onnx.runtime.errors import CudaGraphError
    from deberta_onnx.runtime.session import SessionSettings, create_session, resolve_providers

    graphed = resolve_providers(None, "cuda", cuda_graph=True)
    for fixed in (False, True):
        path = tmp_path / f"distances-{fixed}.onnx"
        onnx.save(_distances(fixed), str(path))
        predicted = len(predict_placement(_distances(fixed)).copies)
        assert _memcpy_nodes(path, tmp_path) == predicted == (0 if fixed else 1)
        if fixed:
            create_session(path, graphed, SessionSettings())
        else:  # ONNX Runtime's own refusal, classified as such
            with pytest.raises(CudaGraphError, match="refused CUDA graphs"):
                create_session(path, graphed, SessionSettings())
    for path in (tiny_model / "model.onnx", _fp16(tiny_model, "standard", tmp_path / "standard"),
                 _fp16(tiny_model, "cuda", tmp_path / "cuda")):
        model, types = level1_graph(path, tmp_path / f"{path.parent.name}-level1")
        assert _memcpy_nodes(path, tmp_path) == len(predict_placement(model, types).copies) == 0
        create_session(path, graphed, SessionSettings())  # CUDA graphs accepted
