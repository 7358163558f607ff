"""Classifiers on exported DeBERTa heads: ``SequenceClassifier`` (sentiment, NLI labels on text pairs),
``CrossEncoder`` (reranker scores for (query, document) pairs) and ``TokenClassifier`` (per-token labels such
as NER, aggregated to word spans).

    from deberta_onnx.runtime import CrossEncoder, TokenClassifier
    scores = CrossEncoder("models/reranker").predict([("query", "doc one"), ("query", "doc two")])
    spans = TokenClassifier("models/ner").predict(["Ada Lovelace lived in London."])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, TypedDict, overload

import numpy as np

from .batching import ModelCall, TokenBatch, capped, token_batches
from .checks import check_positive_int
from .config import ENGINE_ONNXRUNTIME, EncoderConfig
from .contract import LOGITS, TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION
from .loader import LoadedAttributes, LoadedModel, load_model, loaded_property
from .postprocess import AGGREGATIONS, Span, aggregate_spans, classifier_scores, cross_encoder_scores, softmax
from .runners import Runner
from .sentence_transformers_api import PredictKeywords, RankKeywords, alias, check_keywords, with_prompt
from .session import ProviderList
from .similarity import Hit
from .tokenization import check_pairs, check_texts

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CrossEncoder", "Prediction", "RankedDocument", "SequenceClassifier", "Span", "TokenClassifier"]

# A text, a (text, text_pair) pair, or a list of either.
_Inputs = str | tuple[str, str] | Sequence[str | tuple[str, str]]


class RankedDocument(TypedDict):
    """One result of ``CrossEncoder.rank(..., return_documents=True)``, in sentence-transformers' shape."""

    corpus_id: int
    score: float
    text: str


class Prediction(NamedTuple):
    """A sequence classifier's answer for one input: the top label and its probability (or raw score)."""

    label: str
    score: float


def _load(model_dir: str | Path, providers: ProviderList | None, config: EncoderConfig | None, task: str,
          user: str, *, onnxruntime_only: str = "") -> tuple[EncoderConfig, LoadedModel]:
    """Loads ``model_dir`` for ``task``. ``onnxruntime_only``: why ``user`` runs on ONNX Runtime alone; another
    engine is then refused before anything loads."""
    chosen = config or EncoderConfig()
    if onnxruntime_only and chosen.engine != ENGINE_ONNXRUNTIME:
        raise ValueError(f"{user} runs on ONNX Runtime ({onnxruntime_only}); load {model_dir} with "
                         f"EncoderConfig(engine='onnxruntime'), not {chosen.engine!r}.")
    return chosen, load_model(model_dir, providers, chosen, tasks=(task,), user=user)


def _one_or_many(inputs: object, *, texts_allowed: bool) -> tuple[list[str | tuple[str, str]], bool]:
    """(items, whether one input was given rather than a list)."""
    if isinstance(inputs, str) and texts_allowed:
        return [inputs], True
    if isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
        return [inputs], True
    return check_pairs(inputs, texts_allowed=texts_allowed), False


def _plan(loaded: LoadedModel, runner: Runner, items: Sequence[str | tuple[str, str]], batch_size: int | None,
          truncate: bool, show_progress: bool, *, per_row: bool = False, max_tokens: int | None = None
          ) -> Iterator[ModelCall]:
    """The model calls of ``items``: raw logits ``[rows, labels]``, or per row (``per_row``, token classifiers)
    ``(logits [tokens, labels], encoding)``; at most ``max_tokens`` padded tokens per call (``batching.capped``)."""
    run = _run_per_row if per_row else _run_rows
    policy = capped(loaded.policy, max_tokens)
    for batch in token_batches(loaded.tokenizer, items, policy, batch_size, truncate=truncate,
                               show_progress=show_progress, details=per_row):
        yield ModelCall(rows=batch.rows, token_counts=[len(e.ids) for e in batch.encodings],
                        run=partial(run, runner, batch), padded_tokens=batch.input_ids.size)


def _run_rows(runner: Runner, batch: TokenBatch) -> np.ndarray:
    (logits,) = runner.run(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    return logits[: len(batch.rows)]


def _run_per_row(runner: Runner, batch: TokenBatch) -> list[tuple[np.ndarray, object]]:
    (logits,) = runner.run(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    return [(logits[row, : len(encoding.ids)].copy(), encoding) for row, encoding in enumerate(batch.encodings)]


def _sequence_logits(loaded: LoadedModel, items: list[str | tuple[str, str]], batch_size: int | None,
                     truncate: bool, show_progress: bool) -> np.ndarray:
    out = np.empty((len(items), len(loaded.labels)), dtype=np.float32)
    for call in _plan(loaded, loaded.runner, items, batch_size, truncate, show_progress):
        out[call.rows] = call.run()
    return out


def _token_count(loaded: LoadedModel, items: list[str | tuple[str, str]]) -> list[int]:
    return [len(encoding.ids) for encoding in loaded.tokenizer.encodings(items)]


_LABELS_DOC = "Label names in logit order (the checkpoint's ``id2label``)."

class SequenceClassifier(LoadedAttributes):
    """Classifies texts or text pairs with an exported ``...ForSequenceClassification`` model folder.

    An input is a text (``str``) or a pair (``(text, text_pair)`` tuple, e.g. premise and hypothesis for
    NLI); a list may mix both. A tuple of two str is one pair, a list of two str is two texts. Loading
    options and errors are those of ``Encoder``; ``TaskMismatchError`` if the folder holds another kind of
    model.
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config, self.loaded = _load(model_dir, providers, config, TASK_SEQUENCE_CLASSIFICATION,
                                         type(self).__name__)

    labels = loaded_property(lambda m: m.labels, _LABELS_DOC)

    def token_count(self, inputs: _Inputs) -> list[int]:
        """Tokens the model sees per input (special tokens included, after truncation); errors as ``logits``."""
        return _token_count(self.loaded, _one_or_many(inputs, texts_allowed=True)[0])

    def plan(self, inputs: Sequence[str | tuple[str, str]], batch_size: int | None = None, *,
             truncate: bool = True, max_tokens: int | None = None) -> Iterator[ModelCall]:
        """``logits``' work as separate model calls, run one by one by the caller (the server): each
        ``call.run()`` gives the raw logits ``[len(call.rows), len(labels)]`` of ``call.rows``, positions in
        ``inputs``. ``logits`` runs exactly these calls; ``probabilities`` and ``CrossEncoder.predict`` apply their
        activation (``postprocess.classifier_scores``, ``postprocess.cross_encoder_scores``) to them.
        ``max_tokens`` caps each call's padded tokens, as ``Encoder.plan``'s does.

        Raises:
            TypeError: an input is neither a str nor a pair of str (at once).
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and an input is too long.
        """
        items = check_pairs(inputs, texts_allowed=True)
        check_positive_int("batch_size", batch_size, optional=True)
        check_positive_int("max_tokens", max_tokens, optional=True)
        return _plan(self.loaded, self.loaded.runner, items, batch_size, truncate, False, max_tokens=max_tokens)

    def logits(self, inputs: _Inputs, batch_size: int | None = None, *, truncate: bool = True,
               show_progress: bool = False) -> np.ndarray:
        """Raw logits: float32 ``[len(inputs), len(labels)]`` (``[len(labels)]`` for a single input).

        Raises:
            TypeError: an input is neither a str nor a pair of str (the message names its index).
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and an input is too long.
        """
        items, single = _one_or_many(inputs, texts_allowed=True)
        out = _sequence_logits(self.loaded, items, batch_size, truncate, show_progress)
        return out[0] if single else out

    def probabilities(self, inputs: _Inputs, batch_size: int | None = None, *, truncate: bool = True,
                      show_progress: bool = False) -> np.ndarray:
        """Scores per label, as transformers' text-classification pipeline gives them: softmax over the
        labels; the sigmoid of each logit for one-label and multi-label models; raw logits for regression."""
        logits = self.logits(inputs, batch_size, truncate=truncate, show_progress=show_progress)
        return classifier_scores(logits, problem_type=self.manifest.model.problem_type, labels=len(self.labels))

    def predict(self, inputs: _Inputs, batch_size: int | None = None, *, truncate: bool = True,
                show_progress: bool = False) -> Prediction | list[Prediction]:
        """The top label and its score (see ``probabilities``) per input, in input order.

        Returns:
            One ``Prediction(label, score)`` per input; a single one for a single input.

        Raises:
            TypeError / ValueError: as ``logits``.
        """
        items, single = _one_or_many(inputs, texts_allowed=True)
        scores = self.probabilities(items, batch_size, truncate=truncate, show_progress=show_progress)
        best = scores.argmax(axis=1)
        out = [Prediction(self.labels[int(i)], float(row[i])) for i, row in zip(best, scores)]
        return out[0] if single else out


class CrossEncoder(LoadedAttributes):
    """Scores (query, document) pairs with an exported cross-encoder (a ``...ForSequenceClassification``
    model), as sentence-transformers' ``CrossEncoder.predict`` does.

    The score activation is the one sentence-transformers saved with the model; otherwise the sigmoid for
    one-label models and none for several labels. Loading options and errors are those of ``Encoder``.
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config, self.loaded = _load(model_dir, providers, config, TASK_SEQUENCE_CLASSIFICATION,
                                         type(self).__name__)

    labels = loaded_property(lambda m: m.labels, _LABELS_DOC)

    num_labels = loaded_property(lambda m: len(m.labels), "How many scores per pair (sentence-transformers' name).")

    def token_count(self, pairs: tuple[str, str] | Sequence[tuple[str, str]]) -> list[int]:
        """Tokens the model sees per pair (special tokens included, after truncation); errors as ``predict``."""
        return _token_count(self.loaded, _one_or_many(pairs, texts_allowed=False)[0])

    def predict(self, pairs: tuple[str, str] | Sequence[tuple[str, str]], batch_size: int | None = None, *,
                activation: bool = True, truncate: bool = True, show_progress: bool = False, prompt: str | None = None,
                **keywords: Unpack[PredictKeywords]) -> np.ndarray | float:
        """Scores each pair.

        sentence-transformers' ``CrossEncoder.predict`` keywords are accepted too (``PredictKeywords``):
        ``show_progress_bar`` (``show_progress``), ``activation_fn`` (a numpy function replacing the model's
        activation), ``apply_softmax``; ``convert_to_numpy``, ``convert_to_tensor``, ``device`` and ``prompt_name``
        are checked and refused where they would need torch or another device.

        Args:
            pairs: ``(text, text_pair)`` tuples, or one tuple.
            batch_size: pairs per model call (``None``: 32, or as ``config.max_tokens`` allows).
            activation: apply the model's score activation (see the class); false gives raw logits.
            truncate: cut pairs longer than ``max_length`` tokens, longest text first (default); else raise.
            show_progress: show a progress bar (tqdm).
            prompt: a text prepended to the first text of each pair, as sentence-transformers' ``prompt``.

        Returns:
            float32 ``[len(pairs)]`` for one-label models, ``[len(pairs), len(labels)]`` otherwise; a float
            (or ``[len(labels)]``) for a single pair.

        Raises:
            TypeError: an item is not a pair of str, or an unknown keyword.
            ValueError: ``batch_size`` < 1, ``truncate`` is false and a pair is too long, or a sentence-transformers
                keyword that cannot apply.
        """
        check_keywords("CrossEncoder.predict", keywords, PredictKeywords, device=self.device)
        show_progress = alias("show_progress", show_progress, False, "show_progress_bar",
                              keywords.get("show_progress_bar"))
        function = keywords.get("activation_fn")
        if function is not None and (not activation or not callable(function)
                                     or type(function).__module__.split(".")[0] == "torch"):
            raise ValueError("activation_fn must be a function of the numpy logits [n, labels] (not a torch module: "
                             "torch is not used), and needs activation=True; activation=False gives the raw logits")
        items, single = _one_or_many(pairs, texts_allowed=False)
        scores = _sequence_logits(self.loaded, with_prompt(items, prompt), batch_size, truncate, show_progress)
        if function is not None:
            scores = np.asarray(function(scores), dtype=np.float32)
        elif activation:
            scores = cross_encoder_scores(scores, self.manifest.model.score_activation, labels=len(self.labels))
        if keywords.get("apply_softmax") and scores.shape[1] > 1:
            scores = softmax(scores)
        if scores.shape[1] == 1:
            scores = scores[:, 0]
        return float(scores[0]) if single and scores.ndim == 1 else (scores[0] if single else scores)

    @overload
    def rank(self, query: str, documents: Sequence[str], top_k: int | None = ..., batch_size: int | None = ..., *,
             truncate: bool = ..., show_progress: bool = ..., prompt: str | None = ...,
             return_documents: Literal[False] = ..., **keywords: Unpack[RankKeywords]) -> list[Hit]: ...
    @overload
    def rank(self, query: str, documents: Sequence[str], top_k: int | None = ..., batch_size: int | None = ..., *,
             truncate: bool = ..., show_progress: bool = ..., prompt: str | None = ...,
             return_documents: Literal[True], **keywords: Unpack[RankKeywords]) -> list[RankedDocument]: ...

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, batch_size: int | None = None, *,
             truncate: bool = True, show_progress: bool = False, prompt: str | None = None,
             return_documents: bool = False, **keywords: Unpack[RankKeywords]) -> list[Hit] | list[RankedDocument]:
        """Scores ``(query, document)`` for every document and returns them best first.

        Takes ``predict``'s sentence-transformers keywords (``RankKeywords``) and its ``return_documents``.

        Returns:
            ``Hit(index, score)`` per document (the ``top_k`` best if given), highest score first, equal
            scores in index order; a ``Hit`` also reads as sentence-transformers' ``hit["corpus_id"]``,
            ``hit["score"]``. With ``return_documents=True``, sentence-transformers' own shape instead: a dict
            ``{"corpus_id": index, "score": score, "text": document}`` per document.

        Raises:
            ValueError: the model has several labels (no single score to rank by), or bad ``top_k``.
            TypeError: ``query`` or a document is not a str.
        """
        check_keywords("CrossEncoder.rank", keywords, RankKeywords, device=self.device)
        if len(self.labels) != 1:
            raise ValueError(f"rank needs a one-label cross-encoder; {self.model_dir} has labels {list(self.labels)}")
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        check_positive_int("top_k", top_k, optional=True)
        docs = check_texts(documents)
        scores = np.asarray(self.predict([(query, d) for d in docs], batch_size, truncate=truncate,
                                         show_progress=show_progress, prompt=prompt, **keywords))
        order = np.lexsort((np.arange(len(docs)), -scores))[:top_k]
        if return_documents:
            return [RankedDocument(corpus_id=int(i), score=float(scores[i]), text=docs[i]) for i in order]
        return [Hit(int(i), float(scores[i])) for i in order]


class TokenClassifier(LoadedAttributes):
    """Labels each token of a text with an exported ``...ForTokenClassification`` model folder (e.g. NER)
    and aggregates the labels into spans of the text. Loading options and errors are those of ``Encoder``."""

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config, self.loaded = _load(model_dir, providers, config, TASK_TOKEN_CLASSIFICATION,
                                         type(self).__name__)

    labels = loaded_property(lambda m: m.labels, _LABELS_DOC)

    def token_count(self, texts: str | Sequence[str]) -> list[int]:
        """Tokens the model sees per text (special tokens included, after truncation); errors as ``logits``."""
        return _token_count(self.loaded, [texts] if isinstance(texts, str) else list(check_texts(texts)))

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

    def plan(self, texts: Sequence[str], batch_size: int | None = None, *, truncate: bool = True,
             max_tokens: int | None = None) -> Iterator[ModelCall]:
        """``predict``'s work as separate model calls, run one by one by the caller (the server): each
        ``call.run()`` gives, per row of ``call.rows`` (positions in ``texts``), ``(logits, encoding)``: the raw
        logits ``[tokens, labels]`` of that text's own tokens and its tokenizer encoding, which ``spans`` turns
        into ``predict``'s spans. ``max_tokens`` caps each call's padded tokens, as ``Encoder.plan``'s does.

        Raises:
            TypeError: ``texts`` is not a list of str (at once).
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and a text is too long.
        """
        items = check_texts(texts)
        check_positive_int("batch_size", batch_size, optional=True)
        check_positive_int("max_tokens", max_tokens, optional=True)
        return _plan(self.loaded, self._logits_runner(), items, batch_size, truncate, False,
                     per_row=True, max_tokens=max_tokens)

    def spans(self, text: str, output: tuple[np.ndarray, object], *, aggregation: str = "first",
              ignore_labels: Sequence[str] = ("O",)) -> list[Span]:
        """``predict``'s spans of ``text`` from one row's output of a ``plan`` call (``(logits, encoding)``)."""
        logits, encoding = output
        return aggregate_spans(text, encoding.offsets, encoding.word_ids,  # type: ignore[attr-defined]
                               softmax(logits), self.labels, aggregation=aggregation, ignore_labels=ignore_labels)

    def _logits_runner(self) -> Runner:
        return self.loaded.runner_for((LOGITS,))

    def _run(self, items: list[str], batch_size: int | None, truncate: bool, show_progress: bool
             ) -> list[tuple[np.ndarray, object]]:
        out: list[tuple[np.ndarray, object] | None] = [None] * len(items)
        for call in _plan(self.loaded, self._logits_runner(), items, batch_size, truncate,
                          show_progress, per_row=True):
            for index, item in zip(call.rows, call.run()):
                out[index] = item
        return [item for item in out if item is not None]

    @overload
    def predict(self, texts: str, batch_size: int | None = ..., *,  # type: ignore[overload-overlap]
                aggregation: str = ..., ignore_labels: Sequence[str] = ..., truncate: bool = ...,
                show_progress: bool = ...) -> list[Span]: ...
    @overload
    def predict(self, texts: Sequence[str], batch_size: int | None = ..., *, aggregation: str = ...,
                ignore_labels: Sequence[str] = ..., truncate: bool = ..., show_progress: bool = ...
                ) -> list[list[Span]]: ...

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
                                truncate=truncate, show_progress=show_progress)[0]
        items = check_texts(texts)
        out: list[list[Span]] = []
        for text, output in zip(items, self._run(items, batch_size, truncate, show_progress)):
            out.append(self.spans(text, output, aggregation=aggregation, ignore_labels=ignore_labels))
        return out
