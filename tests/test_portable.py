"""The portable export (``--portable``): standard ONNX operators only in every variant, the DeBERTa rewrites kept;
``onnx.reference`` (the ONNX standard's own evaluator, which knows no contrib operator) runs each variant and
agrees with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from deberta_onnx.export import ExportConfig
from deberta_onnx.export._portable import nonstandard_ops
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.cli import build_parser
from deberta_onnx.runtime.cli.export import config_from_args
from deberta_onnx.runtime.contract import PRECISIONS

from .conftest import HARD_TEXTS
from .graph_checks import check_folder_graphs
from .reference import reference_embeddings


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def portable(portable_model: Path) -> Path:
    """Every precision of the tiny checkpoint, portable, with the token vectors output too."""
    return portable_model


def test_every_variant_holds_standard_operators_only(portable: Path, tiny_model: Path) -> None:
    manifest = json.loads((portable / "manifest.json").read_text())
    assert check_folder_graphs(portable) == sorted(PRECISIONS)
    optimization = manifest["optimization"]
    assert optimization["portable"] is True and optimization["enabled"] is True
    assert optimization["relative_attention_layers_folded"] == manifest["model"]["num_hidden_layers"]
    assert "fused_operators" not in optimization
    for precision, entry in manifest["variants"].items():
        model = onnx.load(str(portable / entry["file"]))
        assert nonstandard_ops(model) == {}, precision
        assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}, precision
        assert precision == "fp32" or entry["quality"]["passed"] is True
    # The default export fuses with ONNX Runtime's contrib operators, which this option leaves out.
    default = nonstandard_ops(onnx.load(str(tiny_model / "model.onnx")))
    assert default and all(name.startswith("com.microsoft.") for name in default)
    assert json.loads((tiny_model / "manifest.json").read_text())["optimization"]["portable"] is False


def _for_the_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.reference implements (De)QuantizeLinear from opset 19 only (onnx 1.2x: "No implementation for operator
    'DequantizeLinear' domain '' and version 18"); the QDQ graph (int8-static, opset 18) is run there as opset 19,
    whose (De)QuantizeLinear computes the same for int8 with float scales. ONNX Runtime runs it as exported."""
    opset = next(entry for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if opset.version < 19 and any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        opset.version = 19
    return model


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_reference_evaluator_runs_each_variant_as_onnx_runtime_does(portable: Path, precision: str) -> None:
    encoder = Encoder(portable, config=EncoderConfig(precision=precision))
    ids, mask = encoder.loaded.tokenizer.pad(encoder.loaded.tokenizer.encode(HARD_TEXTS[:4]))
    feeds = {"input_ids": ids, "attention_mask": mask}
    path = str(portable / encoder.manifest.variants[precision].file)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = ReferenceEvaluator(_for_the_reference(onnx.load(path))).run(None, feeds)
    assert len(actual) == len(expected) == 2
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and np.isfinite(got).all()
        if precision == "fp32":
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        else:  # other kernels, other rounding: within a hair of ONNX Runtime's vectors
            assert _cosine(got * mask[..., None] if got.ndim == 3 else got,
                           want * mask[..., None] if want.ndim == 3 else want).min() >= 0.9999


def test_portable_vectors_match_the_default_export_and_pytorch(portable: Path, tiny_model: Path,
                                                               tiny_checkpoint: Path) -> None:
    expected = reference_embeddings(tiny_checkpoint, HARD_TEXTS)
    fp32 = Encoder(portable, config=EncoderConfig(precision="fp32")).encode(HARD_TEXTS)
    default = Encoder(tiny_model, config=EncoderConfig(precision="fp32")).encode(HARD_TEXTS)
    np.testing.assert_allclose(fp32, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fp32, default, atol=1e-4, rtol=1e-4)


def test_portable_is_a_flag_and_refuses_the_fused_attention() -> None:
    args = build_parser().parse_args(["export", "src", "out", "--portable"])
    assert config_from_args(args).portable is True
    with pytest.raises(ValueError, match="MultiHeadAttention contrib operator"):
        ExportConfig(portable=True, attention="fused")
