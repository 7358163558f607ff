"""The question-answering wire format (``POST /v1/question-answering``) for extractive question-answering models.
Standard library only; kept apart from the HTTP stack so that it can be tested, and reused, without a server.

The route is named after the task as transformers' pipeline and the Hugging Face Inference API name it
(``question-answering``), and as the manifest records it, beside ``/v1/classify`` and ``/v1/rerank``.

Request: ``question`` a string or a list of them; ``context`` a string (for every question) or a list as long as
the questions; ``model``; and ``QuestionAnswerer.answer``'s options ``top_k``, ``max_answer_len``, ``max_seq_len``,
``doc_stride``, ``handle_impossible_answer``, ``align_to_words`` (transformers' defaults). ``max_inputs`` bounds the
questions, and the windows their contexts make (a long context runs as several).

Response, one item per question in request order::

    {"object": "list", "model": "...", "usage": {...}, "data": [{"object": "answers", "index": 0,
     "answers": [{"score": 0.91, "start": 22, "end": 28, "answer": "London"}]}]}

``answers`` holds up to ``top_k`` answers, best first, as ``QuestionAnswerer.answer`` gives them; offsets count
Unicode code points (Python ``str`` indices) of the context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .wire import bad_request, check_bool, check_count, check_fields, check_model, check_text, read_object, too_many

__all__ = ["QuestionAnsweringRequest", "parse_qa_request", "qa_response"]

_COUNTS = ("top_k", "max_answer_len", "max_seq_len")
_FLAGS = ("handle_impossible_answer", "align_to_words")
_FIELDS = ("question", "context", "model", *_COUNTS, "doc_stride", *_FLAGS)
_EXAMPLE = '{"question": "Where did Ada live?", "context": "Ada Lovelace lived in London."}'


@dataclass(frozen=True, kw_only=True)
class QuestionAnsweringRequest:
    """A checked ``POST /v1/question-answering`` body: ``(question, context)`` pairs in request order, the model
    the client named (or ``None``), and the options given (``QuestionAnswerer.options`` keywords)."""

    pairs: list[tuple[str, str]]
    model: str | None
    options: dict[str, Any]


def _texts(value: object, name: str) -> list[str] | None:
    """A list field's texts, or ``None`` for a single string (checked by the caller)."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not value:
        raise bad_request(f"field {name!r} must be a string or a non-empty list of strings", name)
    return [check_text(item, f"{name}[{index}]") for index, item in enumerate(value)]


def parse_qa_request(body: bytes, *, max_inputs: int) -> QuestionAnsweringRequest:
    """Parses and checks a question-answering request body.

    Raises:
        ApiError: 400 for malformed JSON, a missing, unknown or mistyped field, an empty question or context, or
            lists of different lengths (the message names the field and index); 413 for more than ``max_inputs``
            questions.
    """
    data = read_object(body, example=_EXAMPLE)
    check_fields(data, _FIELDS, ("question", "context"))
    questions, contexts = _texts(data["question"], "question"), _texts(data["context"], "context")
    if questions is None:
        if contexts is not None:
            raise bad_request("one 'question' with a list of 'context' is ambiguous; send the question once per "
                              "context", "context")
        questions = [check_text(data["question"], "question")]
    if len(questions) > max_inputs:
        raise too_many("question", len(questions), max_inputs, "questions")
    if contexts is None:
        contexts = [check_text(data["context"], "context")] * len(questions)
    elif len(contexts) != len(questions):
        raise bad_request(f"field 'context' holds {len(contexts)} contexts for {len(questions)} questions; send one "
                          "context per question, or one string for all of them", "context")
    for name, texts in (("question", questions), ("context", contexts)):
        for index, text in enumerate(texts):
            if not text:
                raise bad_request(f"{name} {index} is empty; every question needs a non-empty context", name)
    options: dict[str, Any] = {name: check_count(data, name) for name in _COUNTS if data.get(name) is not None}
    stride = data.get("doc_stride")
    if stride is not None:
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 0:
            raise bad_request(f"field 'doc_stride' must be an integer >= 0, got {stride!r}", "doc_stride")
        options["doc_stride"] = stride
    for name in _FLAGS:
        if data.get(name) is not None:
            options[name] = check_bool(data, name, False)
    return QuestionAnsweringRequest(pairs=list(zip(questions, contexts)), model=check_model(data), options=options)


def qa_response(answers: Sequence[Sequence[Mapping[str, Any]]], *, token_counts: Sequence[int], model: str
                ) -> dict[str, Any]:
    """The response body: per question, its answers (``QuestionAnswerer.answers``); ``usage`` counts every token
    of every window the model ran."""
    data = [{"object": "answers", "index": index, "answers": [dict(answer) for answer in found]}
            for index, found in enumerate(answers)]
    tokens = int(sum(token_counts))
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
