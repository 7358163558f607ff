"""Classifiers on exported DeBERTa heads: ``SequenceClassifier`` (sentiment, NLI labels on text pairs),
``CrossEncoder`` (reranker scores for (query, document) pairs) and ``TokenClassifier`` (per-token labels such
as NER, aggregated to word spans).

    from deberta_onnx.runtime import CrossEncoder, TokenClassifier
    scores = CrossEncoder("models/reranker").predict([("query", "doc one"), ("query", "doc two")])
    spans = TokenClassifier("models/ner").predict(["Ada Lovelace lived in London."])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._session import SessionRunner
from .tokenization import check_pairs, check_texts
from .contract import LOGITS, TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION
from .encoder import _OnnxModel
from .similarity import Hit

__all__ = [
    "AGGREGATIONS",
    "CrossEncoder",
    "Prediction",
    "SequenceClassifier",
    "Span",
    "TokenClassifier",
    "aggregate_spans",
    "sigmoid",
    "softmax",
]

# How token labels become spans, as in transformers' token-classification pipeline: "none" (one span per
# token), "simple" (neighbouring tokens of one entity merged), and the word-level ones, which first give each
# word one label from its first token, the average of its tokens' probabilities, or its most confident token.
AGGREGATIONS = ("none", "simple", "first", "average", "max")


# A text, a (text, text_pair) pair, or a list of either.
_Inputs = str | tuple[str, str] | Sequence[str | tuple[str, str]]


class Prediction(NamedTuple):
    """A sequence classifier's answer for one input: the top label and its probability (or raw score)."""

    label: str
    score: float


class Span(NamedTuple):
    """A labelled piece of a text: ``text[start:end]``, without surrounding whitespace."""

    label: str
    score: float
    start: int
    end: int
    text: str


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed stably."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function, without overflow warnings for large negative logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


class _SequenceModel(_OnnxModel):
    """Loading and logits shared by ``SequenceClassifier`` and ``CrossEncoder``."""

    _TASKS = (TASK_SEQUENCE_CLASSIFICATION,)
    _TEXTS_ALLOWED = True

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names in logit order (the checkpoint's ``id2label``)."""
        return self.manifest.labels

    def _inputs(self, inputs: object) -> tuple[list[str | tuple[str, str]], bool]:
        """(items, whether one input was given rather than a list)."""
        if isinstance(inputs, str) and self._TEXTS_ALLOWED:
            return [inputs], True
        if isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
            return [inputs], True
        return check_pairs(inputs, texts_allowed=self._TEXTS_ALLOWED), False

    def _logits(self, items: list[str | tuple[str, str]], batch_size: int | None, truncate: bool,
                show_progress: bool) -> np.ndarray:
        out = np.empty((len(items), len(self.labels)), dtype=np.float32)
        for batch in self._batches(items, batch_size, truncate=truncate, show_progress=show_progress):
            (logits,) = self.runner.run(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            out[batch.rows] = logits
        return out


class SequenceClassifier(_SequenceModel):
    """Classifies texts or text pairs with an exported ``...ForSequenceClassification`` model folder.

    An input is a text (``str``) or a pair (``(text, text_pair)`` tuple, e.g. premise and hypothesis for
    NLI); a list may mix both. A tuple of two str is one pair, a list of two str is two texts. Loading
    options and errors are those of ``Encoder``; ``TaskMismatchError`` if the folder holds another kind of
    model.
    """

    def logits(self, inputs: _Inputs, batch_size: int | None = None, *, truncate: bool = True,
               show_progress: bool = False) -> np.ndarray:
        """Raw logits: float32 ``[len(inputs), len(labels)]`` (``[len(labels)]`` for a single input).

        Raises:
            TypeError: an input is neither a str nor a pair of str (the message names its index).
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and an input is too long.
        """
        items, single = self._inputs(inputs)
        out = self._logits(items, batch_size, truncate, show_progress)
        return out[0] if single else out

    def probabilities(self, inputs: _Inputs, batch_size: int | None = None, *, truncate: bool = True,
                      show_progress: bool = False) -> np.ndarray:
        """Scores per label, as transformers' text-classification pipeline gives them: softmax over the
        labels; the sigmoid of each logit for one-label and multi-label models; raw logits for regression."""
        logits = self.logits(inputs, batch_size, truncate=truncate, show_progress=show_progress)
        problem = self.manifest.model.get("problem_type")
        if problem == "regression":
            return logits
        if problem == "multi_label_classification" or len(self.labels) == 1:
            return sigmoid(logits)
        return softmax(logits)

    def predict(self, inputs: _Inputs, batch_size: int | None = None, *, truncate: bool = True,
                show_progress: bool = False) -> Prediction | list[Prediction]:
        """The top label and its score (see ``probabilities``) per input, in input order.

        Returns:
            One ``Prediction(label, score)`` per input; a single one for a single input.

        Raises:
            TypeError / ValueError: as ``logits``.
        """
        items, single = self._inputs(inputs)
        scores = self.probabilities(items, batch_size, truncate=truncate, show_progress=show_progress)
        best = scores.argmax(axis=1)
        out = [Prediction(self.labels[int(i)], float(row[i])) for i, row in zip(best, scores)]
        return out[0] if single else out


class CrossEncoder(_SequenceModel):
    """Scores (query, document) pairs with an exported cross-encoder (a ``...ForSequenceClassification``
    model), as sentence-transformers' ``CrossEncoder.predict`` does.

    The score activation is the one sentence-transformers saved with the model; otherwise the sigmoid for
    one-label models and none for several labels. Loading options and errors are those of ``Encoder``.
    """

    _TEXTS_ALLOWED = False

    def _activate(self, logits: np.ndarray) -> np.ndarray:
        default = "sigmoid" if len(self.labels) == 1 else "identity"
        activation = self.manifest.model.get("score_activation") or default
        if activation == "sigmoid":
            return sigmoid(logits)
        if activation == "tanh":
            return np.tanh(logits)
        return logits

    def predict(self, pairs: tuple[str, str] | Sequence[tuple[str, str]], batch_size: int | None = None, *,
                activation: bool = True, truncate: bool = True, show_progress: bool = False) -> np.ndarray | float:
        """Scores each pair.

        Args:
            pairs: ``(text, text_pair)`` tuples, or one tuple.
            batch_size: pairs per model call (``None``: 32, or as ``config.max_tokens`` allows).
            activation: apply the model's score activation (see the class); false gives raw logits.
            truncate: cut pairs longer than ``max_length`` tokens, longest text first (default); else raise.
            show_progress: show a progress bar (tqdm).

        Returns:
            float32 ``[len(pairs)]`` for one-label models, ``[len(pairs), len(labels)]`` otherwise; a float
            (or ``[len(labels)]``) for a single pair.

        Raises:
            TypeError: an item is not a pair of str.
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and a pair is too long.
        """
        items, single = self._inputs(pairs)
        scores = self._logits(items, batch_size, truncate, show_progress)
        if activation:
            scores = self._activate(scores)
        if scores.shape[1] == 1:
            scores = scores[:, 0]
        return float(scores[0]) if single and scores.ndim == 1 else (scores[0] if single else scores)

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, batch_size: int | None = None, *,
             truncate: bool = True, show_progress: bool = False) -> list[Hit]:
        """Scores ``(query, document)`` for every document and returns them best first.

        Returns:
            ``Hit(index, score)`` per document (the ``top_k`` best if given), highest score first, equal
            scores in index order.

        Raises:
            ValueError: the model has several labels (no single score to rank by), or bad ``top_k``.
            TypeError: ``query`` or a document is not a str.
        """
        if len(self.labels) != 1:
            raise ValueError(f"rank needs a one-label cross-encoder; {self.model_dir} has labels {list(self.labels)}")
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        docs = check_texts(documents)
        scores = np.asarray(self.predict([(query, d) for d in docs], batch_size, truncate=truncate,
                                         show_progress=show_progress))
        order = np.lexsort((np.arange(len(docs)), -scores))[:top_k]
        return [Hit(int(i), float(scores[i])) for i in order]


class TokenClassifier(_OnnxModel):
    """Labels each token of a text with an exported ``...ForTokenClassification`` model folder (e.g. NER)
    and aggregates the labels into spans of the text. Loading options and errors are those of ``Encoder``."""

    _TASKS = (TASK_TOKEN_CLASSIFICATION,)

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names in logit order (the checkpoint's ``id2label``)."""
        return self.manifest.labels

    def logits(self, texts: str | Sequence[str], batch_size: int | None = None, *, truncate: bool = True,
               show_progress: bool = False) -> np.ndarray | list[np.ndarray]:
        """Raw logits per text: float32 ``[tokens, len(labels)]``, padding removed (special tokens included).

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and a text is too long.
        """
        if isinstance(texts, str):
            return self.logits([texts], batch_size, truncate=truncate, show_progress=show_progress)[0]
        return [logits for logits, _ in self._run(check_texts(texts), batch_size, truncate, show_progress)]

    def _run(self, items: list[str], batch_size: int | None, truncate: bool, show_progress: bool
             ) -> list[tuple[np.ndarray, object]]:
        runner = SessionRunner(self.session, (LOGITS,))
        out: list[tuple[np.ndarray, object] | None] = [None] * len(items)
        for batch in self._batches(items, batch_size, truncate=truncate, show_progress=show_progress, details=True):
            (logits,) = runner.run(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            for row, (index, encoding) in enumerate(zip(batch.rows, batch.encodings)):
                out[index] = (logits[row, : len(encoding.ids)].copy(), encoding)
        return [item for item in out if item is not None]

    def predict(self, texts: str | Sequence[str], batch_size: int | None = None, *, aggregation: str = "first",
                ignore_labels: Sequence[str] = ("O",), truncate: bool = True, show_progress: bool = False
                ) -> list[Span] | list[list[Span]]:
        """Labelled spans per text (see ``aggregate_spans``), in input order.

        Args:
            texts: a list of str, or a single str.
            batch_size: texts per model call (``None``: 32, or as ``config.max_tokens`` allows).
            aggregation: one of ``AGGREGATIONS``; default ``"first"`` (each word takes its first token's label).
            ignore_labels: labels that are not entities.
            truncate: cut texts longer than ``max_length`` tokens (default; later words get no span); else raise.
            show_progress: show a progress bar (tqdm).

        Returns:
            A list of ``Span`` per text; a single list for a single str.

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: unknown ``aggregation``, ``batch_size`` < 1, or ``truncate`` is false and a text is too long.
        """
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if isinstance(texts, str):
            return self.predict([texts], batch_size, aggregation=aggregation, ignore_labels=ignore_labels,
                                truncate=truncate, show_progress=show_progress)[0]  # type: ignore[return-value]
        items = check_texts(texts)
        out: list[list[Span]] = []
        for text, (logits, encoding) in zip(items, self._run(items, batch_size, truncate, show_progress)):
            out.append(aggregate_spans(text, encoding.offsets, encoding.word_ids,  # type: ignore[attr-defined]
                                       softmax(logits), self.labels, aggregation=aggregation,
                                       ignore_labels=ignore_labels))
        return out


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
