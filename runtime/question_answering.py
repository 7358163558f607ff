"""Extractive question answering (``QuestionAnswerer``): the answer to a question is a span of its context, found by
an exported ``...ForQuestionAnswering`` model's start and end logits, exactly as transformers 4.x's
``question-answering`` pipeline finds it (transformers 5 removed that pipeline).

    from deberta_onnx.runtime import QuestionAnswerer
    qa = QuestionAnswerer("models/squad2")
    qa.answer("Where does Ada live?", "Ada Lovelace lived in London.")  # {"score": ..., "start": 22, "end": 28, ...}

Three stages, as everywhere in the runtime: the (question, context) pair is cut into windows of ``max_seq_len``
tokens that overlap by ``doc_stride`` (``TextTokenizer.windows``); every window of a call runs through the model in
the usual length-sorted batches; each window's logits become span scores (``window_spans``) and the best spans of
all windows, with character offsets into the context, become the answers (``pick_answers``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypedDict

import numpy as np
from tokenizers import Encoding

from .batching import ModelCall, TokenBatch, capped, encoding_batches
from .checks import check_positive_int
from .config import EncoderConfig
from .contract import END_LOGITS, START_LOGITS, TASK_QUESTION_ANSWERING
from .errors import ContractMismatchError
from .loader import LoadedAttributes, LoadedModel, load_model, loaded_property
from .runners import Runner
from .session import ProviderList
from .tokenization import TextTokenizer, lone_surrogate

__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "Answer",
    "AnswerOptions",
    "QuestionAnswerer",
    "Window",
    "pick_answers",
    "window_spans",
]

# The logit that transformers' pipeline gives tokens that cannot be in an answer (question, special tokens,
# padding) before its softmax: far enough below any trained logit that their probability is exactly 0.
_MASKED_LOGIT = -10000.0
# The first token of every window ([CLS]): the pipeline leaves it out of the mask, so that its logits count in the
# softmax (SQuAD2 models put the null answer there), and reads its probability as the null answer's.
_CLS_TOKEN = "[CLS]"
# transformers' pipeline's window: 384 tokens, or the model's maximum if shorter.
DEFAULT_MAX_SEQ_LEN = 384


class Answer(TypedDict):
    """One answer, in the shape of transformers' pipeline: the span's probability (start probability times end
    probability), its character offsets in the context (``context[start:end]``) and its text. The null answer of
    ``handle_impossible_answer`` is ``{"score": ..., "start": 0, "end": 0, "answer": ""}``."""

    score: float
    start: int
    end: int
    answer: str


@dataclass(frozen=True, kw_only=True)
class AnswerOptions:
    """How answers are found; the defaults are transformers' pipeline's.

    Attributes:
        top_k: answers per question, best first (fewer when the context has fewer spans).
        max_answer_len: longest answer, in tokens.
        max_seq_len: tokens per window, question and special tokens included (capped at the model's maximum).
        doc_stride: tokens by which consecutive windows of a long context overlap.
        handle_impossible_answer: also consider the null answer (SQuAD2's "no answer"), scored as the lowest
            probability any window gives its first token ([CLS]) as both start and end.
        align_to_words: widen the span to whole words (the words of the tokenizer's pre-tokenizer), as the pipeline
            does by default; false keeps the tokens' own offsets.
    """

    top_k: int = 1
    max_answer_len: int = 15
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    doc_stride: int = 128
    handle_impossible_answer: bool = False
    align_to_words: bool = True

    def __post_init__(self) -> None:
        for name in ("top_k", "max_answer_len", "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("doc_stride", self.doc_stride, minimum=0)
        if self.doc_stride >= self.max_seq_len:
            raise ValueError(f"doc_stride ({self.doc_stride}) must be less than max_seq_len ({self.max_seq_len}): "
                             "windows overlap by doc_stride tokens")
        for name in ("handle_impossible_answer", "align_to_words"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")


@dataclass(frozen=True)
class Window:
    """One window's model output, ready for ``window_spans``: start and end logits over its own tokens, and its
    encoding (ids, which tokens are context, character offsets)."""

    start_logits: np.ndarray
    end_logits: np.ndarray
    encoding: Encoding


def _probabilities(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the window, with the tokens that cannot start or end an answer at ``_MASKED_LOGIT``; in the
    logits' own dtype (float32), as the pipeline computes it."""
    masked = np.where(allowed, logits, logits.dtype.type(_MASKED_LOGIT))
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()


def window_spans(window: Window, *, cls_id: int | None, top_k: int, max_answer_len: int
                 ) -> tuple[list[tuple[int, int, float]], float]:
    """The best spans of one window and its null score.

    A span runs from token ``s`` to token ``e`` (``s <= e < s + max_answer_len``) and scores ``p_start[s] *
    p_end[e]``, the probabilities a softmax gives over the context tokens and [CLS] (``_probabilities``). The
    first token's probabilities are the null score, and are then set to 0. Spans whose ends are not context
    tokens are left out (the first token and [CLS] count as context, as in the pipeline: such spans have
    probability 0, and win only where nothing else has more). Equal scores are ordered by start, then end.

    Returns:
        ``([(s, e, score)] best first, at most top_k; null score)``.
    """
    encoding = window.encoding
    length = len(encoding.ids)
    context = np.array([sequence == 1 for sequence in encoding.sequence_ids], dtype=bool)
    allowed = context | (np.asarray(encoding.ids) == cls_id) if cls_id is not None else context
    starts = _probabilities(window.start_logits[:length], allowed)
    ends = _probabilities(window.end_logits[:length], allowed)
    null = float(starts[0] * ends[0])
    starts[0] = ends[0] = 0.0
    # scores[s, d]: the span from s to s + d. Rows follow s and columns d, so the flattened order is (start, end).
    width = min(max_answer_len, length)
    index = np.arange(length)[:, None] + np.arange(width)[None, :]
    inside = index < length
    index = np.minimum(index, length - 1)
    scores = starts[:, None] * ends[index]
    desired = allowed.copy()
    desired[0] = True
    valid = (inside & desired[:, None] & desired[index]).ravel()
    flat = scores.ravel()
    candidates = np.flatnonzero(valid)
    order = candidates[np.lexsort((candidates, -flat[candidates]))[:top_k]] if top_k > 1 else (
        candidates[[int(np.argmax(flat[candidates]))]] if len(candidates) else candidates)
    spans = [(int(i // width), int(i // width + i % width), float(flat[i])) for i in order]
    return spans, null


def _char_span(encoding: Encoding, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of tokens ``start`` to ``end``: widened to their words when asked and both
    tokens belong to a word of the context, else the tokens' own offsets."""
    if align_to_words:
        words = (encoding.token_to_word(start), encoding.token_to_word(end))
        if words[0] is not None and words[1] is not None:
            first = encoding.word_to_chars(words[0], 1)
            last = encoding.word_to_chars(words[1], 1)
            if first is not None and last is not None:
                return first[0], last[1]
    return encoding.offsets[start][0], encoding.offsets[end][1]


def pick_answers(context: str, windows: Sequence[Window], *, cls_id: int | None, options: AnswerOptions
                 ) -> list[Answer]:
    """The best answers to one question from its windows' outputs: each window's ``top_k`` spans (in window order),
    the null answer last when ``handle_impossible_answer`` asks for it, sorted by score (a stable sort: equal
    scores keep that order), the first ``top_k``."""
    answers: list[Answer] = []
    null = 1_000_000.0  # above any probability, as the pipeline starts it
    for window in windows:
        spans, window_null = window_spans(window, cls_id=cls_id, top_k=options.top_k,
                                          max_answer_len=options.max_answer_len)
        null = min(null, window_null)
        for start, end, score in spans:
            first, last = _char_span(window.encoding, start, end, options.align_to_words)
            answers.append(Answer(score=score, start=first, end=last, answer=context[first:last]))
    if options.handle_impossible_answer:
        answers.append(Answer(score=null, start=0, end=0, answer=""))
    return sorted(answers, key=lambda answer: -answer["score"])[: options.top_k]


def _check_pairs(questions: object, contexts: object) -> tuple[list[tuple[str, str]], bool]:
    """``(question, context)`` pairs as the pipeline reads them (one of each; a list of each, as long; or a list of
    questions on one context), and whether one question was asked.

    Raises:
        TypeError: neither a str nor a list of str.
        ValueError: lists of different lengths, an empty question or context (the pipeline's error), or a text
            that is not valid Unicode.
    """
    def as_list(value: object, name: str) -> list[str] | None:
        if isinstance(value, str):
            return None
        if not isinstance(value, Sequence) or isinstance(value, bytes) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__}")
        return list(value)

    question_list, context_list = as_list(questions, "question"), as_list(contexts, "context")
    if question_list is None and context_list is None:
        pairs, single = [(str(questions), str(contexts))], True
    elif question_list is not None and context_list is None:
        pairs, single = [(q, str(contexts)) for q in question_list], False
    elif question_list is not None and context_list is not None:
        if len(question_list) != len(context_list):
            raise ValueError(f"got {len(question_list)} questions and {len(context_list)} contexts; give one "
                             "context per question, or one context for all of them")
        pairs, single = list(zip(question_list, context_list)), False
    else:
        raise TypeError("one question with several contexts is ambiguous; repeat the question once per context")
    for index, pair in enumerate(pairs):
        for name, text in zip(("question", "context"), pair):
            if not text:
                raise ValueError(f"{name} {index} is empty; a question needs a context to find its answer in, and "
                                 "a context a question (transformers' pipeline refuses them too)")
            position = lone_surrogate(text)
            if position is not None:
                raise ValueError(f"{name} {index} is not valid Unicode: a lone surrogate U+{ord(text[position]):04X} "
                                 f"at character {position}. Decode bytes with errors='replace' before asking.")
    return pairs, single


class QuestionAnswerer(LoadedAttributes):
    """Answers questions from a context with an exported ``...ForQuestionAnswering`` model folder (e.g. a
    DeBERTa-v3 SQuAD2 fine-tune), as transformers 4.x's ``question-answering`` pipeline does: same windows, same
    span scores, same offsets. Loading options and errors are those of ``Encoder``; ``TaskMismatchError`` if the
    folder holds another kind of model.
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        self.loaded: LoadedModel = load_model(model_dir, providers, self.config, tasks=(TASK_QUESTION_ANSWERING,),
                                              user=type(self).__name__)
        declared = {spec.name for spec in self.loaded.manifest.outputs}
        if not {START_LOGITS, END_LOGITS} <= declared:
            raise ContractMismatchError(
                f"{self.loaded.manifest.path} declares outputs {sorted(declared)}; a question-answering model needs "
                f"{START_LOGITS} and {END_LOGITS}. Re-export the model."
            )
        self._runner: Runner = self.loaded.runner_for((START_LOGITS, END_LOGITS))
        cls_id = self.loaded.tokenizer.tokenizer.token_to_id(_CLS_TOKEN)
        self.cls_id: int | None = None if cls_id is None else int(cls_id)

    @property
    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer (``TextTokenizer``)."""
        return self.loaded.tokenizer

    def options(self, **options: object) -> AnswerOptions:
        """``AnswerOptions`` from keyword arguments, with the pipeline's defaults for this model: ``max_seq_len``
        384 or the model's maximum if shorter, ``doc_stride`` ``min(max_seq_len // 2, 128)``.

        Raises:
            TypeError: an unknown option, or one of the wrong type.
            ValueError: a bad value (see ``AnswerOptions``), or ``max_seq_len`` over the model's maximum.
        """
        if options.get("max_seq_len") is None:
            options["max_seq_len"] = self.max_seq_len
        if options.get("doc_stride") is None:
            length = options["max_seq_len"]
            options["doc_stride"] = min(length // 2, 128) if isinstance(length, int) else 128
        chosen = AnswerOptions(**options)  # type: ignore[arg-type]
        if chosen.max_seq_len > self.max_length:
            raise ValueError(f"max_seq_len {chosen.max_seq_len} is over the model's maximum of {self.max_length} "
                             "tokens; leave it unset for the model's default window")
        return chosen

    def windows(self, question: str, context: str, options: AnswerOptions | None = None) -> list[Encoding]:
        """The windows one (question, context) pair runs as (see ``TextTokenizer.windows``)."""
        chosen = options or self.options()
        return self.tokenizer.windows(question, context, max_length=chosen.max_seq_len, stride=chosen.doc_stride)

    def pair_windows(self, pairs: Sequence[tuple[str, str]], options: AnswerOptions | None = None
                     ) -> tuple[list[Encoding], list[list[int]]]:
        """Every window of ``pairs``, and for each pair the positions of its own among them.

        Raises:
            TypeError / ValueError: as ``answer``.
        """
        chosen = options or self.options()
        checked, _ = _check_pairs([q for q, _ in pairs], [c for _, c in pairs])
        windows: list[Encoding] = []
        owners: list[list[int]] = []
        for question, context in checked:
            own = self.windows(question, context, chosen)
            owners.append(list(range(len(windows), len(windows) + len(own))))
            windows += own
        return windows, owners

    def token_count(self, windows: Sequence[Encoding]) -> list[int]:
        """Tokens per window (special tokens included): what the model runs for each."""
        return [len(window.ids) for window in windows]

    def plan(self, windows: Sequence[Encoding], batch_size: int | None = None, *, max_tokens: int | None = None
             ) -> Iterator[ModelCall]:
        """The model calls of ``windows`` (``windows()``'s encodings, of any number of questions), run one by one by
        the caller (the server, which merges the windows of several requests): each ``call.run()`` gives one
        ``Window`` per row of ``call.rows`` (positions in ``windows``); ``answers`` turns a question's windows into
        its answers. ``max_tokens`` caps each call's padded tokens, as ``Encoder.plan``'s does.

        Raises:
            ValueError: ``batch_size`` or ``max_tokens`` is not a positive int (at once).
        """
        check_positive_int("batch_size", batch_size, optional=True)
        check_positive_int("max_tokens", max_tokens, optional=True)
        policy = capped(self.loaded.policy, max_tokens)
        return (ModelCall(rows=batch.rows, token_counts=[len(e.ids) for e in batch.encodings],
                          run=partial(self._run, batch), padded_tokens=batch.input_ids.size)
                for batch in encoding_batches(self.tokenizer, list(windows), policy, batch_size))

    def _run(self, batch: TokenBatch) -> list[Window]:
        starts, ends = self._runner.run(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return [Window(starts[row, : len(e.ids)].copy(), ends[row, : len(e.ids)].copy(), e)
                for row, e in enumerate(batch.encodings)]

    def answers(self, context: str, windows: Sequence[Window], options: AnswerOptions | None = None) -> list[Answer]:
        """A pair's answers from its windows' outputs (``pick_answers``)."""
        return pick_answers(context, windows, cls_id=self.cls_id, options=options or self.options())

    def answer(self, question: str | Sequence[str], context: str | Sequence[str], *, top_k: int = 1,
               max_answer_len: int = 15, max_seq_len: int | None = None, doc_stride: int | None = None,
               handle_impossible_answer: bool = False, align_to_words: bool = True,
               batch_size: int | None = None) -> Answer | list[Answer] | list[Answer | list[Answer]]:
        """Answers each question from its context.

        Args:
            question: a question, or a list of them.
            context: the text to find the answer in; one per question, or one for every question.
            top_k, max_answer_len, max_seq_len, doc_stride, handle_impossible_answer, align_to_words: see
                ``AnswerOptions``; ``None`` takes the pipeline's defaults for this model (``options``).
            batch_size: windows per model call (``None``: 32, or as ``config.max_tokens`` allows). Every window
                of every question of the call is batched together.

        Returns:
            For one question, an ``Answer`` (``top_k=1``) or a list of up to ``top_k`` of them, best first; for a
            list of questions, a list of those.

        Raises:
            TypeError: a question or context is not a str (or list of str).
            ValueError: an empty question or context, lists of different lengths, a bad option, or a question too
                long to leave room for the context in a window (the message says how long).
        """
        options = self.options(top_k=top_k, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
                               doc_stride=doc_stride, handle_impossible_answer=handle_impossible_answer,
                               align_to_words=align_to_words)
        pairs, single = _check_pairs(question, context)
        windows, owners = self.pair_windows(pairs, options)
        outputs: list[Window | None] = [None] * len(windows)
        for call in self.plan(windows, batch_size):
            for row, window in zip(call.rows, call.run()):
                outputs[row] = window
        results: list[Answer | list[Answer]] = []
        for (_, text), rows in zip(pairs, owners):
            found = self.answers(text, [outputs[row] for row in rows], options)  # type: ignore[misc]
            results.append(found[0] if top_k == 1 else found)
        return results[0] if single else results

    max_seq_len = loaded_property(lambda m: min(m.max_length, DEFAULT_MAX_SEQ_LEN),
                                  "The default window: 384 tokens, or the model's maximum if shorter.")
