"""The CUDA-oriented fp16 recipe: LayerNorm, the fused residual add + LayerNorm and softmax in fp16 (as ONNX
Runtime's CUDA kernels run them), what must stay fp32 kept so, and the recipe chosen at export."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from deberta_onnx.export import RECIPES, ExportConfig, export_model
from deberta_onnx.export.precision import build_fp16, prepare_base, recipe_chain
from deberta_onnx.export.testing import make_batch
from deberta_onnx.runtime.cli import build_parser
from deberta_onnx.runtime.cli.export import config_from_args

from .cuda_placement import element_types

_NORMALIZATION = ("LayerNormalization", "SkipLayerNormalization", "Softmax")


def _recipe(name: str):  # type: ignore[no-untyped-def]
    return next(recipe for recipe in RECIPES["fp16"] if recipe.name == name)


def _build(folder: Path, out: Path, recipe: str, keep: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict[str, int]]:
    out.mkdir(parents=True, exist_ok=True)
    base = prepare_base(folder / "model.onnx", out / "folded.onnx")
    build_fp16(_recipe(recipe), base, out / "model.fp16.onnx", keep_nodes=keep)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.fp16.onnx")))
    return model, element_types(model)


def test_cuda_recipe_runs_normalisation_in_fp16_with_fewer_casts(tiny_model: Path, tmp_path: Path) -> None:
    standard, standard_types = _build(tiny_model, tmp_path / "standard", "standard")
    cuda, cuda_types = _build(tiny_model, tmp_path / "cuda", "cuda")
    casts = {name: Counter(n.op_type for n in model.graph.node)["Cast"]
             for name, model in (("standard", standard), ("cuda", cuda))}
    assert casts["cuda"] < casts["standard"], casts
    for model, types, kind in ((standard, standard_types, TensorProto.FLOAT), (cuda, cuda_types, TensorProto.FLOAT16)):
        normalization = [n for n in model.graph.node if n.op_type in _NORMALIZATION]
        # The embeddings' LayerNorm feeds the encoder; the encoder's last one feeds the pooling, which stays fp32.
        encoder = [n for n in normalization if types[n.output[0]] == kind]
        assert len(encoder) >= len(normalization) - 1, [(n.name, types[n.output[0]]) for n in normalization]
        # The relative-position buckets (a float log) and the output stay fp32 in both.
        assert all(types[n.output[0]] == TensorProto.FLOAT for n in model.graph.node if n.op_type == "Log")
        made_by = {out: node for node in model.graph.node for out in node.output}
        (output,) = model.graph.output
        # The pooled vector is written in fp32 by the pooling itself: no round trip through fp16 at the end.
        assert made_by[output.name].op_type != "Cast" and types[output.name] == TensorProto.FLOAT
    # Both stay close to the fp32 graph (on the CPU, which runs fp16 nodes through fp32 casts).
    rng = np.random.default_rng(5)
    ids, mask = make_batch(4, 40, 1000, rng)
    feed = {"input_ids": ids, "attention_mask": mask}
    reference = ort.InferenceSession(str(tiny_model / "model.onnx")).run(None, feed)[0]
    for name in ("standard", "cuda"):
        vectors = ort.InferenceSession(str(tmp_path / name / "model.fp16.onnx")).run(None, feed)[0]
        live = mask.sum(1) > 0  # an all-padding row is a zero vector in both
        a, b = vectors[live], reference[live]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.999 and not vectors[~live].any(), (name, cosine)


def test_nodes_a_range_check_names_stay_fp32(tiny_model: Path, tmp_path: Path) -> None:
    folded = onnx.load(str(prepare_base(tiny_model / "model.onnx", tmp_path / "folded.onnx")))
    skips = [n.name for n in folded.graph.node if n.op_type == "SkipLayerNormalization"]
    model, types = _build(tiny_model, tmp_path / "kept", "cuda", keep=(skips[0],))
    by_name = {n.name: n for n in model.graph.node}
    assert types[by_name[skips[0]].output[0]] == TensorProto.FLOAT
    assert any(types[by_name[name].output[0]] == TensorProto.FLOAT16 for name in skips[1:])


def test_the_recipe_is_chosen_at_export_and_recorded(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ExportConfig(precisions=("fp16",), fp16_recipe="cuda", validation_shapes=((2, 5), (3, 17)), quiet=True)
    folder = export_model(tiny_checkpoint, tmp_path / "model", config).out_dir
    entry = json.loads((folder / "manifest.json").read_text())["variants"]["fp16"]
    assert entry["recipe"] == "cuda" and entry["quality"]["passed"] and entry["quality"]["min_cosine"] >= 0.999
    # Only the encoder's last residual add + LayerNorm stays fp32: it feeds the pooling, which is fp32.
    assert entry["nodes"]["fp32_nodes"].get("SkipLayerNormalization", 0) <= 1
    # --fallback goes on to the safer recipes after the chosen one.
    assert [r.name for r in recipe_chain("fp16", ExportConfig(fp16_recipe="cuda"))] == [
        "cuda", "standard", "elementwise-fp32"]
    assert [r.name for r in recipe_chain("fp16", ExportConfig())] == ["standard", "elementwise-fp32"]
    assert recipe_chain("int8-static", ExportConfig(fp16_recipe="cuda"))[0].name == "all"
    with pytest.raises(ValueError, match="fp16_recipe must be one of cuda, standard, elementwise-fp32"):
        ExportConfig(fp16_recipe="fast")
    args = build_parser("export").parse_args(["export", "src", "out", "--fp16-recipe", "cuda"])
    assert config_from_args(args).fp16_recipe == "cuda"
