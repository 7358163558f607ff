"""cos_sim and semantic_search on hand-built arrays (ties, zero vectors), against a brute-force ranking and
against sentence-transformers' own implementation, and in bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Hit, cos_sim, semantic_search
from deberta_onnx.runtime.similarity import dot_score


def _brute_force(queries: np.ndarray, corpus: np.ndarray, top_k: int, score: str) -> list[list[tuple[int, float]]]:
    """Every score, then a full sort: highest score first, lower index first among equals."""
    q, c = queries.astype(np.float64), corpus.astype(np.float64)
    if score == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)
    full = q @ c.T
    out = []
    for row in full:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:top_k]
        out.append([(i, float(row[i])) for i in order])
    return out


def test_cos_sim_by_hand() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[5.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    r = 1 / np.sqrt(2)
    expected = np.array([[1.0, r], [0.0, r], [r, 1.0], [0.0, 0.0]])
    out = cos_sim(a, b)
    assert out.shape == (4, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert cos_sim(a[2], b[1]).shape == (1, 1)  # vectors count as one row
    np.testing.assert_allclose(dot_score(a, b), a.astype(np.float64) @ b.T.astype(np.float64))
    assert cos_sim(np.zeros((2, 3)), np.zeros((1, 3))).tolist() == [[0.0], [0.0]]  # zero vectors: 0, not NaN


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="length 3 but b of length 2"):
        cos_sim(np.ones((1, 3)), np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"corpus\[1\] holds NaN"):
        semantic_search(np.ones((1, 2)), np.array([[1.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        semantic_search(np.ones((1, 2)), np.ones((3, 2)), top_k=0)
    with pytest.raises(ValueError, match="score must be one of cosine, dot"):
        semantic_search(np.ones((1, 2)), np.ones((3, 2)), score="l2")
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        semantic_search(np.ones((2, 2, 2)), np.ones((3, 2)))
    with pytest.raises(TypeError, match="must hold numbers"):
        cos_sim(np.array([["a", "b"]]), np.ones((1, 2)))


def test_ties_and_zero_vectors_rank_by_index() -> None:
    # Rows 1, 2 and 4 all point along x: cosine exactly 1 with the query. Rows 0 and 3 (a zero vector) score 0.
    corpus = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    query = np.array([1.0, 0.0], dtype=np.float32)
    for chunk in (1, 2, 5, 100):
        hits = semantic_search(query, corpus, top_k=4, corpus_chunk_size=chunk)
        assert hits == [[Hit(1, 1.0), Hit(2, 1.0), Hit(4, 1.0), Hit(0, 0.0)]], chunk
        assert semantic_search(query, corpus, top_k=2, corpus_chunk_size=chunk) == [[Hit(1, 1.0), Hit(2, 1.0)]]
    everything = semantic_search(query, corpus, top_k=50)[0]
    assert [h.index for h in everything] == [1, 2, 4, 0, 3] and np.isfinite([h.score for h in everything]).all()


@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("top_k", [1, 3, 10, 40])
def test_chunked_search_equals_brute_force_with_many_ties(score: str, top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    # Small integers: dot products are exact in float32, so ties are many and exact.
    corpus = rng.integers(-2, 3, size=(37, 4)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(11, 4)).astype(np.float32)
    expected = _brute_force(queries, corpus, top_k, score)
    for query_chunk, corpus_chunk in ((3, 7), (11, 37), (1, 1), (100, 5)):
        hits = semantic_search(queries, corpus, top_k=top_k, score=score, query_chunk_size=query_chunk,
                               corpus_chunk_size=corpus_chunk)
        assert len(hits) == len(queries)
        for got, want in zip(hits, expected):
            assert len(got) == min(top_k, len(corpus))
            np.testing.assert_allclose([h.score for h in got], [s for _, s in want], atol=1e-6)
            if score == "dot":  # exact scores: the tie order must match too
                assert [h.index for h in got] == [i for i, _ in want]


def test_random_floats_equal_brute_force_and_sentence_transformers() -> None:
    import torch
    from sentence_transformers import util

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((500, 24))
    queries = rng.standard_normal((30, 24))
    hits = semantic_search(queries, corpus, top_k=7, query_chunk_size=8, corpus_chunk_size=64)
    expected = _brute_force(queries, corpus, 7, "cosine")
    theirs = util.semantic_search(torch.from_numpy(queries), torch.from_numpy(corpus), top_k=7)
    for got, want, other in zip(hits, expected, theirs):
        assert [h.index for h in got] == [i for i, _ in want] == [o["corpus_id"] for o in other]
        np.testing.assert_allclose([h.score for h in got], [o["score"] for o in other], atol=1e-9)


def test_empty_corpus_and_queries() -> None:
    assert semantic_search(np.ones((2, 3)), np.ones((0, 3))) == [[], []]
    assert semantic_search(np.ones((0, 3)), np.ones((4, 3))) == []


@pytest.mark.slow
def test_memory_mapped_corpus_never_needs_the_full_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((400_000, 8)).astype(np.float32)
    queries = rng.standard_normal((64, 8)).astype(np.float32)
    np.save(tmp_path / "corpus.npy", corpus)
    mapped = np.load(tmp_path / "corpus.npy", mmap_mode="r")
    tracemalloc.start()
    hits = semantic_search(queries, mapped, top_k=5, query_chunk_size=32, corpus_chunk_size=10_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full_matrix = 64 * 400_000 * 4
    assert peak < full_matrix / 8, (peak, full_matrix)
    # Spot-check a few queries against the in-memory brute force.
    for q in (0, 17, 63):
        want = _brute_force(queries[q : q + 1], corpus, 5, "cosine")[0]
        assert [h.index for h in hits[q]] == [i for i, _ in want]
