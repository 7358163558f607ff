"""A model folder exported by an earlier run of this version (``tests/data/manifest-v1``, written by
``tests/data/build_stored_model.py``), checked against what PyTorch computed for it when it was made.

It needs no torch, so it runs where the runtime's dependencies are at their declared lower bounds
(``.ci/compat runtime-floor``): an older onnxruntime runs a graph exported with the newest one, an older
tokenizers reads its ``tokenizer.json``. And every later version of the runtime must load the folder, or refuse
it with the manifest-version error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import MANIFEST_VERSION
from deberta_onnx.runtime.errors import ManifestError
from deberta_onnx.runtime.postprocess import normalize_rows

from .conftest import STORED_MODEL

MODEL = STORED_MODEL / "model"


def _stored_version() -> int:
    return int(json.loads((MODEL / "manifest.json").read_text(encoding="utf-8"))["manifest_version"])


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    if _stored_version() != MANIFEST_VERSION:
        pytest.skip(f"the stored folder has manifest version {_stored_version()}, which this runtime refuses "
                    "(test_the_stored_folder_loads_or_is_refused_by_version)")
    return dict(json.loads((STORED_MODEL / "reference.json").read_text(encoding="utf-8")))


def test_the_stored_folder_loads_or_is_refused_by_version() -> None:
    stored = _stored_version()
    if stored == MANIFEST_VERSION:
        encoder = Encoder(MODEL)  # checksums, manifest fields, and the graph against the contract
        assert encoder.precision == "int8-dynamic"  # the CPU's first choice among the variants it holds
        assert encoder.hidden_size == 32
    else:
        with pytest.raises(ManifestError, match=f"manifest_version {stored}; this runtime reads version "
                                                f"{MANIFEST_VERSION}"):
            Encoder(MODEL)


def test_tokenizer_gives_the_stored_sentencepiece_ids(reference: dict[str, Any]) -> None:
    texts = [text for text, _ in reference["tokenization"]]
    tokenizer = Encoder(MODEL, config=EncoderConfig(precision="fp32")).loaded.tokenizer
    for (text, ids), got in zip(reference["tokenization"], tokenizer.encode(texts)):
        assert got == ids, text


def _embedding(reference: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    texts = [text for text, _ in reference["embedding"]]
    return texts, np.array([vector for _, vector in reference["embedding"]], dtype=np.float32)


@pytest.mark.parametrize("batch_size", [1, 6, 32])
def test_fp32_vectors_equal_the_stored_pytorch_vectors(reference: dict[str, Any], batch_size: int) -> None:
    texts, expected = _embedding(reference)
    vectors = Encoder(MODEL, config=EncoderConfig(precision="fp32")).encode(texts, batch_size=batch_size)
    np.testing.assert_allclose(vectors, expected, atol=1e-4, rtol=0)


def test_int8_dynamic_keeps_the_quality_gate(reference: dict[str, Any]) -> None:
    """Per text, the cosine to PyTorch's fp32 vector stays above the export's int8 gate (0.99)."""
    texts, expected = _embedding(reference)
    vectors = Encoder(MODEL).encode(texts, batch_size=8, normalize=True)
    cosines = (vectors * normalize_rows(expected)).sum(axis=1)
    assert cosines.min() >= 0.99, dict(zip(texts, cosines.round(4).tolist()))


def test_the_stored_files_are_what_the_manifest_lists() -> None:
    manifest = json.loads((MODEL / "manifest.json").read_text(encoding="utf-8"))
    on_disk = sorted(p.name for p in Path(MODEL).iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert set(manifest["variants"]) == {"fp32", "int8-dynamic"}
