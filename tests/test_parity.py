"""The runtime against the PyTorch reference, on every tiny checkpoint, at atol 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder

from .conftest import HARD_TEXTS
from .reference import reference_embeddings


def _texts(count: int, corpus: list[str]) -> list[str]:
    pool = HARD_TEXTS + corpus
    rng = np.random.default_rng(count)
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


@pytest.mark.parametrize("count", [1, 3, 17])
def test_encode_matches_pytorch(exported: tuple[Path, Path], corpus: list[str], count: int) -> None:
    checkpoint, folder = exported
    texts = _texts(count, corpus)
    expected = reference_embeddings(checkpoint, texts)
    encoder = Encoder(folder)
    for batch_size in (1, 4, 32):
        actual = encoder.encode(texts, batch_size=batch_size)
        assert actual.shape == (count, 32) and actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_hard_texts_in_one_batch_match_pytorch(exported: tuple[Path, Path]) -> None:
    checkpoint, folder = exported
    expected = reference_embeddings(checkpoint, HARD_TEXTS)
    actual = Encoder(folder).encode(HARD_TEXTS, batch_size=len(HARD_TEXTS))
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_order_is_kept_and_results_do_not_depend_on_batching(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    texts = corpus[:50]
    one_by_one = np.stack([encoder.encode([t])[0] for t in texts])
    batched = encoder.encode(texts, batch_size=8)
    reversed_ = encoder.encode(texts[::-1], batch_size=8)[::-1]
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(reversed_, batched, atol=1e-5, rtol=0)


def test_single_string_gives_one_vector_and_normalize(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    single = encoder.encode("A single sentence.")
    assert single.shape == (encoder.hidden_size,)
    np.testing.assert_array_equal(single, encoder.encode(["A single sentence."])[0])
    unit = encoder.encode(["one", "two"], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_long_text_truncates_by_default_or_raises(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    long_text = "word " * 5000
    truncated = encoder.encode([long_text])
    assert np.isfinite(truncated).all()
    with pytest.raises(ValueError, match=r"texts\[1\] is longer than the model's maximum of 512 tokens"):
        encoder.encode(["short", long_text], truncate=False)


def test_empty_input_gives_empty_array(tiny_model: Path) -> None:
    out = Encoder(tiny_model).encode([])
    assert out.shape == (0, 32) and out.dtype == np.float32
