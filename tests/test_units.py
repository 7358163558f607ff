"""Pure functions on hand-built arrays: padding, normalisation, input checks, manifest checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import EncoderConfig
from deberta_onnx.runtime.contract import INPUTS, MANIFEST_VERSION, SENTENCE_OUTPUT, TensorSpec
from deberta_onnx.runtime.errors import ManifestError, ModelFolderError
from deberta_onnx.runtime.manifest import load_manifest, sha256_file
from deberta_onnx.runtime.postprocess import normalize_rows
from deberta_onnx.runtime.tokenization import check_texts


def test_normalize_rows_unit_length_and_zero_row_stays_zero() -> None:
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], dtype=np.float32)
    out = normalize_rows(vectors)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    assert np.array_equal(out[1], [0.0, 0.0])
    assert np.isfinite(out).all()


def test_check_texts_names_the_bad_index() -> None:
    assert check_texts(("a", "")) == ["a", ""]
    with pytest.raises(TypeError, match=r"texts\[2\] is NoneType"):
        check_texts(["a", "b", None])
    with pytest.raises(TypeError, match=r"texts\[0\] is bytes"):
        check_texts([b"raw"])
    with pytest.raises(TypeError, match="list of str"):
        check_texts(42)


def test_pad_right_pads_and_masks(tiny_model: Path) -> None:
    from deberta_onnx.runtime import Encoder

    tokenizer = Encoder(tiny_model).loaded.tokenizer
    ids, mask = tokenizer.pad([[1, 7, 2], [1, 2], [1, 9, 9, 9, 2]])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[1, 7, 2, 0, 0], [1, 2, 0, 0, 0], [1, 9, 9, 9, 2]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    ids, mask = tokenizer.pad([[1, 2], [1, 5, 2]], multiple_of=16)
    assert ids.shape == (2, 16) and mask.sum() == 5


def test_contract_specs_round_trip() -> None:
    for spec in (*INPUTS, SENTENCE_OUTPUT):
        assert TensorSpec.from_dict(spec.to_dict()) == spec
    assert SENTENCE_OUTPUT.resolved(hidden=768).dims == ("batch", 768)
    assert INPUTS[0].dynamic_axes() == {0: "batch", 1: "sequence"}


def test_encoder_config_rejects_bad_threads() -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        EncoderConfig(intra_op_threads=-1)


def test_manifest_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot be read as JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "deberta-onnx", "manifest_version": 999}))
    with pytest.raises(ManifestError, match=f"manifest_version 999; this runtime reads version {MANIFEST_VERSION}"):
        load_manifest(tmp_path)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_truncate_dimensions_keeps_a_normalising_graphs_promise() -> None:
    from deberta_onnx.runtime.postprocess import truncate_dimensions

    vectors = normalize_rows(np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32))
    # A graph that normalises promises unit vectors: truncation renormalises even when normalize is off.
    kept = truncate_dimensions(vectors, 4, normalize=False, graph_normalizes=True)
    np.testing.assert_allclose(np.linalg.norm(kept, axis=1), 1.0, atol=1e-6)
    raw = truncate_dimensions(vectors, 4, normalize=False, graph_normalizes=False)
    np.testing.assert_array_equal(raw, vectors[:, :4])
    assert truncate_dimensions(vectors, None, normalize=False, graph_normalizes=True) is vectors
    np.testing.assert_allclose(np.linalg.norm(truncate_dimensions(vectors * 3, 8, normalize=True,
                                                                  graph_normalizes=False), axis=1), 1.0, atol=1e-6)

