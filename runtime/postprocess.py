"""Stage three of three: model outputs -> what the caller gets. Pure numpy: L2 normalisation, Matryoshka
truncation, embedding quantization, softmax and sigmoid, classifier scores, and token labels aggregated to spans."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "AGGREGATIONS",
    "EMBEDDING_PRECISIONS",
    "Span",
    "aggregate_spans",
    "classifier_scores",
    "cross_encoder_scores",
    "normalize_rows",
    "quantize_embeddings",
    "row_cosine",
    "sigmoid",
    "softmax",
    "truncate_dimensions",
]

# How token labels become spans, as in transformers' token-classification pipeline: "none" (one span per
# token), "simple" (neighbouring tokens of one entity merged), and the word-level ones, which first give each
# word one label from its first token, the average of its tokens' probabilities, or its most confident token.
AGGREGATIONS = ("none", "simple", "first", "average", "max")

# What an embedding can be stored as (sentence-transformers' ``precision``): the vectors themselves, one byte per
# component (scalar quantization), or one bit per component packed eight to a byte (binary quantization).
EMBEDDING_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalises each row; an all-zero row stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(vectors.dtype).tiny)


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None, *, normalize: bool,
                        graph_normalizes: bool) -> np.ndarray:
    """Keeps the first ``dimensions`` values of each row (Matryoshka truncation) and L2-normalises if asked.

    A graph that normalises its own output promises unit vectors; truncation breaks that promise, so truncated
    rows of such a graph are normalised again even when ``normalize`` is false.

    Args:
        vectors: ``[n, hidden]`` sentence vectors.
        dimensions: how many leading values to keep; ``None`` or ``hidden`` keeps all.
        normalize: L2-normalise the (truncated) rows.
        graph_normalizes: the graph already L2-normalised the full vectors.
    """
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = np.ascontiguousarray(vectors[:, :dimensions])
        normalize = normalize or graph_normalizes
    return normalize_rows(vectors) if normalize else vectors


def quantize_embeddings(vectors: np.ndarray, precision: str, *, ranges: np.ndarray | None = None) -> np.ndarray:
    """Stores each component of ``[n, dim]`` vectors in fewer bits, as sentence-transformers'
    ``quantize_embeddings`` does (same arithmetic, same outputs).

    - ``float32``: unchanged (as float32).
    - ``int8`` / ``uint8``: each dimension's ``[min, max]`` range cut into 256 buckets; the bucket index
      (``uint8``), or it less 128 (``int8``). The ranges come from ``ranges`` or else from ``vectors`` themselves,
      so vectors quantized in different calls are comparable only with one shared ``ranges``.
    - ``binary`` / ``ubinary``: one bit per component (``> 0``), packed eight to a byte, ``[n, ceil(dim / 8)]``;
      ``ubinary`` as uint8, ``binary`` as int8 (the byte less 128). Compare with the Hamming distance.

    Args:
        vectors: float ``[n, dim]`` (or one ``[dim]`` vector for the binary precisions).
        precision: one of ``EMBEDDING_PRECISIONS``.
        ranges: ``[2, dim]`` per-dimension minimum and maximum, for ``int8`` / ``uint8``.

    Raises:
        ValueError: unknown ``precision``; ``int8`` / ``uint8`` without ``ranges`` on fewer than two vectors;
            ``ranges`` of the wrong shape.
    """
    if precision not in EMBEDDING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(EMBEDDING_PRECISIONS)}, got {precision!r}")
    values = np.asarray(vectors)
    if precision == "float32":
        return values.astype(np.float32)
    if precision.endswith("binary"):
        packed = np.packbits(values > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    out_type = np.uint8 if precision == "uint8" else np.int8
    if values.ndim == 2 and len(values) == 0:
        return np.zeros(values.shape, dtype=out_type)
    if ranges is None:
        if values.ndim != 2 or len(values) < 2:
            raise ValueError(f"{precision} buckets need each dimension's range: pass ranges=[min, max] per dimension, "
                             "or at least two vectors (the more, the better) to take the ranges from")
        ranges = np.vstack((values.min(axis=0), values.max(axis=0)))
    bounds = np.asarray(ranges, dtype=np.float32)
    if bounds.shape != (2, values.shape[-1]):
        raise ValueError(f"ranges must be [2, {values.shape[-1]}] (min and max per dimension), got {bounds.shape}")
    steps = (bounds[1] - bounds[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    codes = np.clip(np.floor((values - bounds[0]) / steps), 0, 255)
    return codes.astype(np.uint8) if out_type is np.uint8 else (codes - 128).astype(np.int8)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``, in float64; a zero row scores -1 (never NaN), so
    a broken output can never pass a threshold."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), np.finfo(np.float64).tiny)
    return np.nan_to_num((a64 * b64).sum(axis=1) / norms, nan=-1.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed stably."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function, without overflow warnings for large negative logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def classifier_scores(logits: np.ndarray, *, problem_type: str | None, labels: int) -> np.ndarray:
    """Scores per label, as transformers' text-classification pipeline gives them: softmax over the labels;
    the sigmoid of each logit for one-label and multi-label models; raw logits for regression."""
    if problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification" or labels == 1:
        return sigmoid(logits)
    return softmax(logits)


def cross_encoder_scores(logits: np.ndarray, activation: str | None, *, labels: int) -> np.ndarray:
    """A cross-encoder's scores: its saved activation (``sigmoid``, ``tanh``, ``identity``), else the sigmoid for
    one-label models and none for several labels, as sentence-transformers' ``CrossEncoder`` does."""
    chosen = activation or ("sigmoid" if labels == 1 else "identity")
    if chosen == "sigmoid":
        return sigmoid(logits)
    if chosen == "tanh":
        return np.tanh(logits)
    return logits


class Span(NamedTuple):
    """A labelled piece of a text: ``text[start:end]``, without surrounding whitespace."""

    label: str
    score: float
    start: int
    end: int
    text: str


def _entity(label: str) -> tuple[str, str]:
    """("B" or "I", entity type) of an IOB label; a label without a prefix continues its entity."""
    if len(label) > 2 and label[1] in "-_" and label[0] in "BI":
        return label[0], label[2:]
    return "I", label


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def aggregate_spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    word_ids: Sequence[int | None],
    probabilities: np.ndarray,
    labels: Sequence[str],
    *,
    aggregation: str = "first",
    ignore_labels: Sequence[str] = ("O",),
) -> list[Span]:
    """Turns per-token label probabilities into labelled spans of ``text``.

    Tokens without a word (``None`` in ``word_ids``: [CLS], [SEP], padding) are skipped, and so, in the
    token-level modes, are tokens without characters of their own. ``"none"`` gives one span per token with
    its full label; ``"simple"`` merges neighbouring tokens of one entity; ``"first"``,
    ``"average"`` and ``"max"`` first give each word (the tokenizer's word ids) one probability vector, from
    its first token, the mean over its tokens, or its most confident token, then merge neighbouring words.
    Merging follows IOB tags: ``B-X`` starts an entity X, ``I-X`` (or a bare ``X``) continues an X entity and
    starts one after anything else; a span's score is the mean of its parts' scores and its label is X.

    Args:
        text: the text the offsets point into.
        offsets: ``(start, end)`` character span of each token.
        word_ids: each token's word index, ``None`` for special tokens.
        probabilities: ``[tokens, len(labels)]``, e.g. the softmax of the logits.
        labels: label names in column order.
        aggregation: one of ``AGGREGATIONS``.
        ignore_labels: labels that end an entity and give no span (default ``("O",)``).

    Returns:
        Spans in text order, with whitespace trimmed from their ends.

    Raises:
        ValueError: unknown aggregation, or the lengths of offsets, word_ids and probabilities differ.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if not len(offsets) == len(word_ids) == len(probabilities):
        raise ValueError(f"offsets ({len(offsets)}), word_ids ({len(word_ids)}) and probabilities "
                         f"({len(probabilities)}) must have one entry per token")
    tokens = [i for i, word in enumerate(word_ids) if word is not None]
    units: list[tuple[int, int, np.ndarray]] = []  # (start, end, probabilities)
    if aggregation in ("none", "simple"):
        # A word-start marker with no character of its own (SentencePiece's lone "▁" at the start of a text)
        # borrows the next token's span; it gives no span of its own, or the two would overlap.
        units = [(offsets[i][0], offsets[i][1], probabilities[i]) for i in tokens
                 if not (i + 1 < len(offsets) and word_ids[i + 1] == word_ids[i] and offsets[i + 1] == offsets[i])
                 and offsets[i][1] > offsets[i][0]]
    else:
        words: list[list[int]] = []
        for i in tokens:
            if words and word_ids[words[-1][-1]] == word_ids[i]:
                words[-1].append(i)
            else:
                words.append([i])
        for word in words:
            if aggregation == "first":
                chosen = probabilities[word[0]]
            elif aggregation == "average":
                chosen = probabilities[word].mean(axis=0)
            else:
                chosen = probabilities[max(word, key=lambda i: float(probabilities[i].max()))]
            units.append((offsets[word[0]][0], offsets[word[-1]][1], chosen))
    ignored = set(ignore_labels)
    spans: list[Span] = []
    current: tuple[str, int, int, list[float]] | None = None  # (entity, start, end, scores)

    def close() -> None:
        if current is not None:
            start, end = _trim(text, current[1], current[2])
            spans.append(Span(current[0], float(np.mean(current[3])), start, end, text[start:end]))

    for start, end, probs in units:
        best = int(np.argmax(probs))
        label, score = labels[best], float(probs[best])
        if label in ignored:
            close()
            current = None
            continue
        if aggregation == "none":
            s, e = _trim(text, start, end)
            spans.append(Span(label, score, s, e, text[s:e]))
            continue
        prefix, entity = _entity(label)
        if current is not None and prefix == "I" and current[0] == entity:
            current = (entity, current[1], max(current[2], end), [*current[3], score])
        else:
            close()
            current = (entity, start, end, [score])
    close()
    return spans
