"""Pooling modes fused in the graph (mean, cls, max), with and without L2 normalisation, against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deberta_onnx.runtime import Encoder

from .conftest import HARD_TEXTS
from .reference import reference_embeddings

MODES = [("cls", False), ("max", True), ("mean", True)]


# The quick tier (``-m "not slow"``) exports mean-norm alone; cls and max run the same tests in the full suite.
@pytest.fixture(scope="module", ids=[f"{p}-{'norm' if n else 'raw'}" for p, n in MODES],
                params=[mode if mode[0] == "mean" else pytest.param(mode, marks=pytest.mark.slow) for mode in MODES])
def pooled_model(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[str, bool, Path]:
    from deberta_onnx.export import ExportConfig, export_model

    pooling, normalize = request.param
    out = tmp_path_factory.mktemp(f"pool-{pooling}") / "model"
    export_model(tiny_checkpoint, out, ExportConfig(quiet=True, pooling=pooling, normalize=normalize))
    return pooling, normalize, out


def test_pooling_matches_pytorch(pooled_model: tuple[str, bool, Path], tiny_checkpoint: Path,
                                 corpus: list[str]) -> None:
    pooling, normalize, folder = pooled_model
    texts = HARD_TEXTS + corpus[:20]
    expected = reference_embeddings(tiny_checkpoint, texts, pooling=pooling, normalize=normalize)
    actual = Encoder(folder).encode(texts, batch_size=8)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, rtol=1e-5)
    else:  # the [CLS] vector of a random model is far from unit length: nothing was normalised by accident
        assert np.abs(np.linalg.norm(actual, axis=1) - 1.0).max() > 0.1


def test_manifest_records_pooling_and_validation(pooled_model: tuple[str, bool, Path]) -> None:
    pooling, normalize, folder = pooled_model
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["pooling"] == pooling
    assert manifest["model"]["normalize"] is normalize
    assert manifest["model"]["task"] == "embedding"
    report = manifest["variants"]["fp32"]["validation"]
    assert report["passed"] and all(row["finite"] for row in report["shapes"])
    assert any(row["padded_rows"] for row in report["shapes"])


def test_all_padding_rows_are_finite_zeros(pooled_model: tuple[str, bool, Path]) -> None:
    _, _, folder = pooled_model
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 50, 60, 2], [0, 0, 0, 0], [1, 70, 2, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=np.int64)
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert np.isfinite(out).all()
    assert np.array_equal(out[1], np.zeros(out.shape[1], dtype=np.float32))
    assert np.abs(out[[0, 2]]).sum(axis=1).min() > 0


def test_unknown_pooling_is_refused() -> None:
    from deberta_onnx.export import ExportConfig

    with pytest.raises(ValueError, match="pooling must be one of mean, cls, max"):
        ExportConfig(pooling="median")


def test_matryoshka_truncation_renormalises(pooled_model: tuple[str, bool, Path], corpus: list[str]) -> None:
    from deberta_onnx.runtime.postprocess import normalize_rows

    _, graph_normalizes, folder = pooled_model
    encoder = Encoder(folder)
    texts = corpus[:9]
    full = encoder.encode(texts)
    short = encoder.encode(texts, dimensions=8)
    assert short.shape == (9, 8) and short.flags["C_CONTIGUOUS"]
    if graph_normalizes:  # the model's vectors are unit length, and so are the truncated ones
        np.testing.assert_allclose(short, normalize_rows(full[:, :8]), atol=1e-6)
    else:
        np.testing.assert_array_equal(short, full[:, :8])
    np.testing.assert_allclose(encoder.encode(texts, normalize=True, dimensions=8), normalize_rows(full[:, :8]),
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(encoder.encode(texts, normalize=True, dimensions=3), axis=1), 1.0,
                               rtol=1e-5)
    assert encoder.encode("one text", dimensions=5).shape == (5,)
    np.testing.assert_array_equal(encoder.encode(texts, dimensions=32), full)  # all dimensions: unchanged
    for bad in (0, 33, True, 2.5):
        with pytest.raises(ValueError, match="dimensions must be an int from 1 to 32"):
            encoder.encode(texts, dimensions=bad)  # type: ignore[arg-type]
