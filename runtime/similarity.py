"""Cosine similarity and top-k semantic search over embedding matrices: numpy only, in bounded memory.

    from deberta_onnx.runtime import Encoder, semantic_search
    corpus = encoder.encode(documents)
    hits = semantic_search(encoder.encode(["my question"]), corpus, top_k=5)
    for index, score in hits[0]:
        print(score, documents[index])
"""

from __future__ import annotations

from typing import NamedTuple, SupportsIndex, overload

import numpy as np

from .checks import check_positive_int
from .postprocess import normalize_rows

__all__ = ["SCORES", "Hit", "cos_sim", "dot_score", "semantic_search"]

SCORES = ("cosine", "dot")


class Hit(NamedTuple):
    """One search result: the row ``index`` in the corpus and its ``score`` (higher is more similar).

    Also readable by sentence-transformers' dict keys, so code written for its ``semantic_search`` and
    ``CrossEncoder.rank`` works unchanged: ``hit["corpus_id"]`` is ``hit.index``, ``hit["score"]`` is ``hit.score``.
    """

    index: int  # type: ignore[assignment]  # the field shadows tuple.index, as in the name users expect
    score: float

    @overload
    def __getitem__(self, key: SupportsIndex) -> int | float: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[int | float, ...]: ...
    @overload
    def __getitem__(self, key: str) -> int | float: ...

    def __getitem__(self, key: SupportsIndex | slice | str) -> int | float | tuple[int | float, ...]:
        if isinstance(key, str):
            if key == "corpus_id":
                return self.index
            if key == "score":
                return self.score
            raise KeyError(f"{key!r}: a Hit has the keys 'corpus_id' and 'score' (attributes index and score)")
        return tuple.__getitem__(self, key)


def _matrix(array: object, name: str) -> np.ndarray:
    """A 2-D view of ``array`` (a 1-D vector counts as one row), without copying: a memory-mapped .npy stays
    on disk until its rows are used."""
    out = array if isinstance(array, np.ndarray) else np.asarray(array)
    if out.ndim == 1:
        out = out[None, :]
    if out.ndim != 2:
        raise ValueError(f"{name} must be a vector or a [n, dim] matrix, got an array of shape {out.shape}")
    if not (np.issubdtype(out.dtype, np.floating) or np.issubdtype(out.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {out.dtype}")
    return out


def _float(block: np.ndarray, name: str, start: int = 0) -> np.ndarray:
    """``block`` as float32 (float64 stays float64), refusing NaN and infinity, which would make the ranking
    meaningless."""
    out = block if block.dtype in (np.float32, np.float64) else block.astype(np.float32)
    if not np.isfinite(out).all():
        row = start + int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise ValueError(f"{name}[{row}] holds NaN or infinity; remove or fix that row")
    return out


def _check_dims(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} has vectors of length {a.shape[1]} but {names[1]} of length {b.shape[1]}; both must come "
            "from the same model (and the same `dimensions=`)"
        )


def cos_sim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    Args:
        a: ``[n, dim]`` or a single ``[dim]`` vector.
        b: ``[m, dim]`` or a single ``[dim]`` vector.

    Returns:
        ``[n, m]`` (float32, or float64 when an input is float64). A zero vector scores 0 against everything.

    Raises:
        ValueError: the vector lengths differ, or an input holds NaN or infinity.
        TypeError: an input is not numeric.
    """
    left, right = _matrix(a, "a"), _matrix(b, "b")
    _check_dims(left, right, ("a", "b"))
    return normalize_rows(_float(left, "a")) @ normalize_rows(_float(right, "b")).T


def dot_score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product of every row of ``a`` with every row of ``b``: ``[n, m]``. Arguments and errors as ``cos_sim``."""
    left, right = _matrix(a, "a"), _matrix(b, "b")
    _check_dims(left, right, ("a", "b"))
    return _float(left, "a") @ _float(right, "b").T


def _top_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices ``[rows, k]`` of each row's ``k`` highest scores, unordered; among equal scores at the
    cut, the lowest columns win (``argpartition`` alone would pick any of them)."""
    rows, columns = scores.shape
    if k >= columns:
        return np.broadcast_to(np.arange(columns), (rows, columns)).copy()
    chosen = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, chosen, axis=1).min(axis=1, keepdims=True)
    above = (scores > kth).sum(axis=1)
    tied = (scores == kth).sum(axis=1)
    for row in np.flatnonzero(above + tied > k):
        greater = np.flatnonzero(scores[row] > kth[row])
        ties = np.flatnonzero(scores[row] == kth[row])[: k - len(greater)]
        chosen[row] = np.concatenate([greater, ties])
    return chosen


def semantic_search(
    queries: np.ndarray,
    corpus: np.ndarray,
    top_k: int = 10,
    *,
    score: str = "cosine",
    query_chunk_size: int = 100,
    corpus_chunk_size: int = 100_000,
) -> list[list[Hit]]:
    """The ``top_k`` corpus rows most similar to each query, best first.

    The corpus is read once, in chunks of ``corpus_chunk_size`` rows; each chunk is scored against the
    queries ``query_chunk_size`` at a time, its best ``top_k`` per query are picked with ``argpartition``
    and merged into a running top-k. Memory stays at a few times ``query_chunk_size x corpus_chunk_size``
    scores however large the corpus, so a memory-mapped ``.npy`` (``np.load(path, mmap_mode="r")``) of millions of
    vectors works.

    Args:
        queries: ``[q, dim]`` query vectors, or a single ``[dim]`` vector.
        corpus: ``[n, dim]`` corpus vectors.
        top_k: results per query (fewer when the corpus is smaller).
        score: ``"cosine"`` (vectors are L2-normalised first; zero vectors score 0) or ``"dot"``.
        query_chunk_size: queries scored at once.
        corpus_chunk_size: corpus rows scored at once.

    Returns:
        One list per query of ``Hit(index, score)``, sorted by score, highest first; equal scores in
        ascending index order.

    Raises:
        ValueError: bad ``top_k``, chunk size or ``score``; vector lengths differ; NaN or infinity in an input.
        TypeError: an input is not numeric.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    for name, value in (("top_k", top_k), ("query_chunk_size", query_chunk_size),
                        ("corpus_chunk_size", corpus_chunk_size)):
        check_positive_int(name, value)
    query_rows, corpus_rows = _matrix(queries, "queries"), _matrix(corpus, "corpus")
    _check_dims(query_rows, corpus_rows, ("queries", "corpus"))
    prepared = _float(query_rows, "queries")
    if score == "cosine":
        prepared = normalize_rows(prepared)
    k = min(top_k, len(corpus_rows))
    best_scores = np.empty((len(prepared), 0), dtype=np.float64)
    best_index = np.empty((len(prepared), 0), dtype=np.int64)
    for start in range(0, len(corpus_rows), corpus_chunk_size):
        block = _float(np.asarray(corpus_rows[start : start + corpus_chunk_size]), "corpus", start)
        if score == "cosine":
            block = normalize_rows(block)
        chunk_scores = np.empty((len(prepared), min(k, len(block))), dtype=np.float64)
        chunk_index = np.empty(chunk_scores.shape, dtype=np.int64)
        for q in range(0, len(prepared), query_chunk_size):
            scores = prepared[q : q + query_chunk_size] @ block.T
            columns = _top_columns(scores, k)
            chunk_scores[q : q + query_chunk_size] = np.take_along_axis(scores, columns, axis=1)
            chunk_index[q : q + query_chunk_size] = columns + start
        merged_scores = np.concatenate([best_scores, chunk_scores], axis=1)
        merged_index = np.concatenate([best_index, chunk_index], axis=1)
        order = np.lexsort((merged_index, -merged_scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_index = np.take_along_axis(merged_index, order, axis=1)
    return [[Hit(int(i), float(s)) for i, s in zip(index_row, score_row)]
            for index_row, score_row in zip(best_index, best_scores)]
