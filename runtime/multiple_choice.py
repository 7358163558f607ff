"""Multiple choice (``MultipleChoice``): a prompt (a question, or a context) and the choices offered for it go
through an exported ``...ForMultipleChoice`` model as (prompt, choice) pairs, ``[questions, choices, sequence]``
in one call, and the choices' logits become a softmax, as PyTorch's ``DebertaV2ForMultipleChoice`` gives them
(transformers has no pipeline for the task).

    from deberta_onnx.runtime import MultipleChoice
    result = MultipleChoice("models/swag").predict("She opened the umbrella because", ["it rained.", "it was dry."])
    result.answer, result.scores  # the best choice; the softmax over the choices, in their order
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
from tokenizers import Encoding

from .batching import DEFAULT_BATCH_SIZE, ModelCall, capped
from .checks import check_positive_int
from .classifier import _load
from .config import EncoderConfig
from .contract import TASK_MULTIPLE_CHOICE
from .loader import LoadedAttributes, LoadedModel
from .postprocess import softmax
from .session import ProviderList
from .tokenization import bucket_width

__all__ = ["MultipleChoice", "MultipleChoiceResult", "Question", "check_questions"]

# A prompt and the choices offered for it.
Question = tuple[str, Sequence[str]]


class MultipleChoiceResult(NamedTuple):
    """One question's answer: its choices in the order given, their scores (softmax over the choices, same
    order), the index of the best one and its text."""

    prompt: str
    choices: list[str]
    scores: list[float]
    best: int
    answer: str


def check_questions(questions: object) -> list[tuple[str, list[str]]]:
    """``questions`` as a list of ``(prompt, [choice, ...])``.

    Raises:
        TypeError: not a list of (str, list of str) pairs; the message names the first bad one.
        ValueError: a question offers no choice.
    """
    if isinstance(questions, (str, bytes)) or not isinstance(questions, Sequence):
        raise TypeError(f"questions must be a list of (prompt, [choice, ...]) pairs, got {type(questions).__name__}")
    checked = []
    for index, question in enumerate(questions):
        if not (isinstance(question, (tuple, list)) and len(question) == 2 and isinstance(question[0], str)):
            raise TypeError(f"questions[{index}] must be a (prompt, [choice, ...]) pair, got {question!r:.80}")
        prompt, choices = question
        if isinstance(choices, str) or not isinstance(choices, Sequence) or not all(
                isinstance(choice, str) for choice in choices):
            raise TypeError(f"questions[{index}]: the choices must be a list of str, got {choices!r:.80}")
        if not choices:
            raise ValueError(f"questions[{index}] offers no choice; give at least one (two to choose between)")
        checked.append((prompt, list(choices)))
    return checked


class MultipleChoice(LoadedAttributes):
    """Scores the choices of a prompt with an exported multiple-choice model folder (a
    ``DebertaV2ForMultipleChoice`` checkpoint exported with ``--task multiple-choice``).

    Each choice is paired with its prompt (``tokenizer(prompt, choice)``, cut longest first past the model's
    maximum, as transformers cuts pairs), and a question's choices run in one call as one ``[choices, sequence]``
    row; questions with as many choices are batched together. Loading options and errors are those of
    ``Encoder``; ``TaskMismatchError`` if the folder holds another kind of model; ``ValueError`` for an engine
    other than ONNX Runtime.
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        # The engine choice measures [batch, sequence] calls; this graph takes [batch, choices, sequence].
        self.config, self.loaded = _load(model_dir, providers, config, TASK_MULTIPLE_CHOICE, type(self).__name__,
                                         onnxruntime_only="its graph takes [batch, choices, sequence] inputs")

    def token_count(self, questions: Sequence[Question]) -> list[int]:
        """Tokens the model sees per question, over all its (prompt, choice) pairs (after truncation)."""
        checked = check_questions(questions)
        encodings = self.loaded.tokenizer.encodings(_pairs(checked))
        counts, start = [], 0
        for _, choices in checked:
            counts.append(sum(len(e.ids) for e in encodings[start : start + len(choices)]))
            start += len(choices)
        return counts

    def plan(self, questions: Sequence[Question], batch_size: int | None = None, *, truncate: bool = True,
             max_tokens: int | None = None) -> Iterator[ModelCall]:
        """The model calls of ``questions``, run one by one by the caller (the server): each ``call.run()`` gives a
        list with, per question of ``call.rows`` (positions in ``questions``), its choices' logits ``[choices]``.

        Args:
            questions: ``(prompt, [choice, ...])`` pairs.
            batch_size: most questions per call (``None``: as many as fit 32 (prompt, choice) rows).
            truncate: cut pairs longer than the model's maximum; else raise.
            max_tokens: most padded tokens per call (questions x choices x width); a question always runs.

        Raises:
            TypeError / ValueError: as ``predict``.
        """
        checked = check_questions(questions)
        check_positive_int("batch_size", batch_size, optional=True)
        return _plan(self.loaded, checked, batch_size, truncate, max_tokens)

    def logits(self, questions: Sequence[Question], *, batch_size: int | None = None, truncate: bool = True
               ) -> list[np.ndarray]:
        """The raw logits ``[choices]`` of each question, in input order. Arguments and errors as ``predict``."""
        out: list[np.ndarray | None] = [None] * len(questions)
        for call in self.plan(questions, batch_size, truncate=truncate):
            for row, logits in zip(call.rows, call.run()):
                out[row] = logits
        return [row for row in out if row is not None]

    @overload
    def predict(self, prompt: str, choices: Sequence[str], *, batch_size: int | None = ...,
                truncate: bool = ...) -> MultipleChoiceResult: ...
    @overload
    def predict(self, prompt: Sequence[Question], choices: None = ..., *, batch_size: int | None = ...,
                truncate: bool = ...) -> list[MultipleChoiceResult]: ...

    def predict(self, prompt: str | Sequence[Question], choices: Sequence[str] | None = None, *,
                batch_size: int | None = None, truncate: bool = True
                ) -> MultipleChoiceResult | list[MultipleChoiceResult]:
        """The choices' scores and the best choice: ``softmax(DebertaV2ForMultipleChoice(**pairs).logits)``.

        Args:
            prompt: the question or context; or a list of ``(prompt, [choice, ...])`` pairs (then no ``choices``),
                all run in batches.
            choices: the answers offered for ``prompt``.
            batch_size: most questions per model call (``None``: as many as fit 32 (prompt, choice) rows).
            truncate: cut (prompt, choice) pairs longer than the model's maximum (default); else raise.

        Returns:
            A ``MultipleChoiceResult`` per question (one for a single prompt).

        Raises:
            TypeError: the prompt, choices or questions are not str / lists of str.
            ValueError: a question without choices, ``choices`` given with a list of questions, ``batch_size``
                < 1, or ``truncate`` is false and a pair is too long.
        """
        single = isinstance(prompt, str)
        if single:
            if choices is None:
                raise TypeError("predict(prompt, choices): give the choices offered for the prompt")
            questions: list[Question] = [(str(prompt), choices)]
        elif choices is not None:
            raise ValueError("choices go with a single prompt; for several questions pass a list of "
                             "(prompt, [choice, ...]) pairs alone")
        else:
            questions = list(prompt)  # type: ignore[arg-type]
        checked = check_questions(questions)
        results = [_result(p, c, logits) for (p, c), logits in
                   zip(checked, self.logits(checked, batch_size=batch_size, truncate=truncate))]
        return results[0] if single else results

    __call__ = predict


def choice_scores(logits: np.ndarray) -> np.ndarray:
    """The softmax over one question's choice logits, in float64."""
    return softmax(np.asarray(logits, dtype=np.float64))


def _result(prompt: str, choices: list[str], logits: np.ndarray) -> MultipleChoiceResult:
    scores = choice_scores(logits)
    best = int(scores.argmax())
    return MultipleChoiceResult(prompt, choices, [float(s) for s in scores], best, choices[best])


def _pairs(questions: Sequence[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    return [(prompt, choice) for prompt, choices in questions for choice in choices]


def _plan(loaded: LoadedModel, questions: list[tuple[str, list[str]]], batch_size: int | None, truncate: bool,
          max_tokens: int | None) -> Iterator[ModelCall]:
    tokenizer = loaded.tokenizer
    policy = capped(loaded.policy, max_tokens)
    encodings = tokenizer.encodings(_pairs(questions), truncate=truncate)
    per_question: list[list[Encoding]] = []
    start = 0
    for _, offered in questions:
        per_question.append(encodings[start : start + len(offered)])
        start += len(offered)
    # Questions with as many choices run together (one [questions, choices, sequence] tensor), longest first.
    order = sorted(range(len(questions)),
                   key=lambda i: (len(per_question[i]), -max(len(e.ids) for e in per_question[i])))
    groups: list[list[int]] = []
    for index in order:
        choices = len(per_question[index])
        width = bucket_width(max(len(e.ids) for e in per_question[index]), policy.sequence_bucket,
                             tokenizer.max_length)
        rows_cap = batch_size or max(1, (policy.default_rows or DEFAULT_BATCH_SIZE) // choices)
        group = groups[-1] if groups else None
        if (group is not None and len(per_question[group[0]]) == choices and len(group) < rows_cap
                and (policy.max_tokens is None or (len(group) + 1) * choices * _width(group, per_question, width)
                     <= policy.max_tokens)):
            group.append(index)
        else:
            groups.append([index])
    for group in groups:
        chosen = [per_question[i] for i in group]
        yield ModelCall(rows=group, token_counts=[sum(len(e.ids) for e in q) for q in chosen],
                        run=partial(_run, loaded, chosen),
                        padded_tokens=len(group) * len(chosen[0]) * _width(group, per_question, 1))


def _width(group: list[int], per_question: list[list[Encoding]], at_least: int) -> int:
    return max(at_least, *(len(e.ids) for i in group for e in per_question[i]))


def _run(loaded: LoadedModel, questions: list[list[Encoding]]) -> list[np.ndarray]:
    tokenizer = loaded.tokenizer
    flat = [e for question in questions for e in question]
    ids, mask = tokenizer.pad([e.ids for e in flat], multiple_of=loaded.policy.sequence_bucket)
    shape = (len(questions), len(questions[0]), ids.shape[1])
    types = None
    if loaded.policy.token_types:
        types = tokenizer.pad([e.type_ids for e in flat], multiple_of=loaded.policy.sequence_bucket,
                              fill=0)[0].reshape(shape)
    (logits,) = loaded.runner.run(ids.reshape(shape), mask.reshape(shape), types)
    return [row.copy() for row in logits]
