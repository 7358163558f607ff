"""The wire formats of ``POST /v1/multiple-choice`` and ``POST /v1/fill-mask``. Standard library + numpy; kept apart
from the HTTP stack so that it can be tested, and reused, without a server.

The paths are the tasks' Hugging Face names (the hub's ``pipeline_tag``, transformers' pipeline and the manifest's
``model.task``), as ``/v1/classify`` names its task: no OpenAI, Cohere or TEI endpoint exists for either whose
name to borrow.

Multiple choice. Request: ``input`` one question ``{"prompt": "...", "choices": ["...", ...]}`` or a list of them;
``model``. Each question runs as one row of (prompt, choice) pairs, so ``max_inputs`` bounds the pairs. Response::

    {"object": "list", "model": "...", "usage": {...}, "data": [{"object": "multiple_choice", "index": 0,
     "best": 1, "answer": "...", "scores": [0.2, 0.8]}]}

``scores`` is the softmax over the question's choices, in their order (``MultipleChoice.predict``).

Fill-mask. Request: ``input`` a text with one or more ``[MASK]`` tokens, or a list of them; ``top_k`` (default 5);
``targets`` (a list of words or tokens, or one comma-free string: the pipeline's ``targets=``); ``model``.
Response, one item per text, one list of candidates per mask (in text order) whatever the number of masks::

    {"object": "list", "model": "...", "usage": {...}, "data": [{"object": "fill_mask", "index": 0,
     "masks": [[{"score": 0.31, "token": 1234, "token_str": "Paris", "sequence": "..."}, ...]]}]}

The candidates are transformers' fill-mask pipeline's (``FillMask.predict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..fill_mask import DEFAULT_TOP_K
from .classify_api import _body
from .wire import (
    bad_request,
    check_count,
    check_fields,
    check_model,
    check_text,
    json_type,
    read_object,
    too_many,
)

__all__ = ["FillMaskRequest", "MultipleChoiceRequest", "fill_mask_response", "multiple_choice_response",
           "parse_fill_mask_request", "parse_multiple_choice_request"]

_CHOICE_EXAMPLE = '{"input": {"prompt": "The kettle boiled, so she", "choices": ["made tea.", "went out."]}}'
_MASK_EXAMPLE = '{"input": "The capital of France is [MASK].", "top_k": 3}'


@dataclass(frozen=True, kw_only=True)
class MultipleChoiceRequest:
    """A checked ``POST /v1/multiple-choice`` body: ``(prompt, [choice, ...])`` questions in request order."""

    questions: list[tuple[str, list[str]]]
    model: str | None


@dataclass(frozen=True, kw_only=True)
class FillMaskRequest:
    """A checked ``POST /v1/fill-mask`` body."""

    texts: list[str]
    model: str | None
    top_k: int = DEFAULT_TOP_K
    targets: list[str] | None = None


def parse_multiple_choice_request(body: bytes, *, max_inputs: int) -> MultipleChoiceRequest:
    """Parses and checks a multiple-choice request body.

    Raises:
        ApiError: 400 for malformed JSON, a missing, unknown or mistyped field (named, with the question's index);
            413 for more than ``max_inputs`` (prompt, choice) pairs.
    """
    data = read_object(body, example=_CHOICE_EXAMPLE)
    check_fields(data, ("input", "model"), ("input",))
    value = data["input"]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise bad_request(f"field 'input' must be a question {{\"prompt\": ..., \"choices\": [...]}} or a non-empty "
                          f"list of them, got {json_type(value) if not isinstance(value, list) else 'an empty list'}",
                          "input")
    questions = []
    for index, item in enumerate(items):
        param = "input" if isinstance(value, dict) else f"input[{index}]"
        if not isinstance(item, dict) or set(item) != {"prompt", "choices"}:
            shape = f"an object with {', '.join(map(repr, sorted(item))) or 'no fields'}" if isinstance(
                item, dict) else json_type(item)
            raise bad_request(f"{param} is {shape}; each question must be {{\"prompt\": \"...\", \"choices\": "
                              "[\"...\", ...]}", param)
        choices = item["choices"]
        if not isinstance(choices, list) or not choices:
            raise bad_request(f"{param}.choices must be a non-empty list of strings, got "
                              f"{json_type(choices) if not isinstance(choices, list) else 'an empty list'}",
                              f"{param}.choices")
        questions.append((check_text(item["prompt"], f"{param}.prompt"),
                          [check_text(choice, f"{param}.choices[{k}]") for k, choice in enumerate(choices)]))
    pairs = sum(len(choices) for _, choices in questions)
    if pairs > max_inputs:
        raise too_many("input", pairs, max_inputs, "(prompt, choice) pairs")
    return MultipleChoiceRequest(questions=questions, model=check_model(data))


def parse_fill_mask_request(body: bytes, *, max_inputs: int, mask_token: str) -> FillMaskRequest:
    """Parses and checks a fill-mask request body; every text must hold ``mask_token``.

    Raises:
        ApiError: 400 for malformed JSON, a missing, unknown or mistyped field, a text without the mask token
            (named with its index); 413 for more than ``max_inputs`` texts.
    """
    data = read_object(body, example=_MASK_EXAMPLE)
    check_fields(data, ("input", "model", "top_k", "targets"), ("input",))
    value = data["input"]
    if isinstance(value, str):
        texts = [check_text(value, "input")]
    elif isinstance(value, list) and value:
        if len(value) > max_inputs:
            raise too_many("input", len(value), max_inputs, "texts")
        texts = [check_text(text, f"input[{i}]") for i, text in enumerate(value)]
    else:
        raise bad_request(f"field 'input' must be a string or a non-empty list of strings, got "
                          f"{json_type(value) if not isinstance(value, list) else 'an empty list'}", "input")
    for index, text in enumerate(texts):
        if mask_token not in text:
            param = "input" if isinstance(value, str) else f"input[{index}]"
            raise bad_request(f"{param} has no mask token {mask_token}; mark each position to fill with it, e.g. "
                              f"\"Paris is the {mask_token} of France.\"", param)
    targets = data.get("targets")
    if targets is not None:
        listed = [targets] if isinstance(targets, str) else targets
        if not isinstance(listed, list) or not listed:
            raise bad_request("field 'targets' must be a string or a non-empty list of strings", "targets")
        targets = [check_text(target, f"targets[{i}]") for i, target in enumerate(listed)]
    top_k = check_count(data, "top_k")
    return FillMaskRequest(texts=texts, model=check_model(data), top_k=DEFAULT_TOP_K if top_k is None else top_k,
                           targets=targets)


def multiple_choice_response(results: Sequence[Any], *, token_counts: Sequence[int], model: str) -> dict[str, Any]:
    """The response body of ``POST /v1/multiple-choice`` from ``MultipleChoiceResult``s in input order."""
    data = [{"object": "multiple_choice", "index": index, "best": result.best, "answer": result.answer,
             "scores": list(result.scores)} for index, result in enumerate(results)]
    return _body(data, token_counts, model)


def fill_mask_response(answers: Sequence[list[list[dict[str, Any]]]], *, token_counts: Sequence[int], model: str
                       ) -> dict[str, Any]:
    """The response body of ``POST /v1/fill-mask``: per text, one candidate list per mask."""
    data = [{"object": "fill_mask", "index": index, "masks": masks} for index, masks in enumerate(answers)]
    return _body(data, token_counts, model)

