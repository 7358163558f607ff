"""The classify wire format (``POST /v1/classify``) for sequence and token classifiers. Standard library + numpy;
kept apart from the HTTP stack so that it can be tested, and reused, without a server.

Request: ``input`` a text, or a list whose items are texts or pairs (``["premise", "hypothesis"]`` or
``{"text": ..., "text_pair": ...}``; a top-level list of two strings is two texts, as in the library); ``model``;
for sequence classifiers ``top_k`` (labels listed per input, default all) and ``raw_scores`` (logits instead of
probabilities); for token classifiers ``aggregation`` (``first`` by default; see ``TokenClassifier.predict``).
Pairs are for sequence classifiers only.

Zero-shot classification (an NLI sequence classifier, see ``ZeroShotClassifier``): ``candidate_labels`` (a list of
labels, or one comma-separated string) with texts as ``input``, and optionally ``hypothesis_template`` (default
"This example is {}.") and ``multi_label`` (default false); ``top_k`` applies. Each text runs once per label, so
``max_inputs`` bounds texts x labels. The answer has the sequence classifier's shape, the candidate labels in place
of the model's, ordered as transformers' zero-shot pipeline orders them (equal scores last label first).

Response, one item per input in input order::

    sequence: {"object": "list", "model": "...", "usage": {...}, "data": [{"object": "classification",
               "index": 0, "label": "entailment", "score": 0.93,
               "scores": [{"label": "entailment", "score": 0.93}, {"label": "neutral", "score": 0.05}, ...]}]}
    token:    {"object": "list", "model": "...", "usage": {...}, "data": [{"object": "token_classification",
               "index": 0, "spans": [{"label": "PER", "score": 0.98, "start": 0, "end": 12, "text": "Ada Lovelace"}]}]}

Scores are ``SequenceClassifier.probabilities`` (softmax; the sigmoid for one-label and multi-label models; raw
values for regression), ``scores`` best first (equal scores in label order); ``label``/``score`` are the best, as
``SequenceClassifier.predict`` gives them. Span offsets count Unicode code points (Python ``str`` indices), not
UTF-16 units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contract import TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION
from ..postprocess import AGGREGATIONS, Span
from ..zero_shot import DEFAULT_HYPOTHESIS_TEMPLATE, hypotheses, label_order
from .errors import ApiError
from .wire import (
    bad_request,
    check_bool,
    check_count,
    check_fields,
    check_model,
    check_text,
    json_type,
    read_object,
    too_many,
)

__all__ = ["ClassifyRequest", "classify_response", "parse_classify_request", "token_classify_response",
           "zero_shot_response"]

_COMMON = ("input", "model")
_ZERO_SHOT = ("candidate_labels", "hypothesis_template", "multi_label")
_SEQUENCE_ONLY = ("top_k", "raw_scores", *_ZERO_SHOT)
_TOKEN_ONLY = ("aggregation",)
_EXAMPLE = '{"input": ["a text", ["a premise", "a hypothesis"]]}'

Item = str | tuple[str, str]


@dataclass(frozen=True, kw_only=True)
class ClassifyRequest:
    """A checked ``POST /v1/classify`` body.

    Attributes:
        inputs: texts and ``(text, text_pair)`` tuples in request order (texts only for token classifiers);
            what ``SequenceClassifier.probabilities`` / ``TokenClassifier.predict`` take.
        model: the model the client named, or ``None``.
        top_k: labels to list per input (``None``: all); sequence classifiers only.
        raw_scores: give logits instead of probabilities; sequence classifiers only.
        aggregation: how token labels become spans; token classifiers only.
        candidate_labels: zero-shot classification's labels (``None``: plain classification); the inputs are then
            texts, each run with every label's hypothesis (``pairs``).
        hypothesis_template: zero-shot: the hypothesis each label is put into.
        multi_label: zero-shot: score each label on its own.
    """

    inputs: list[Item]
    model: str | None
    top_k: int | None = None
    raw_scores: bool = False
    aggregation: str = "first"
    candidate_labels: list[str] | None = None
    hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE
    multi_label: bool = False

    def pairs(self) -> list[tuple[str, str]]:
        """Zero-shot: the (text, hypothesis) pairs to run, text by text, each with every label in order."""
        filled = hypotheses(self.candidate_labels or [], self.hypothesis_template)
        return [(str(text), hypothesis) for text in self.inputs for hypothesis in filled]


def parse_classify_request(body: bytes, *, max_inputs: int, task: str) -> ClassifyRequest:
    """Parses and checks a classify request body for a model of ``task``.

    Args:
        body: the raw request body (UTF-8 JSON).
        max_inputs: the most inputs one request may carry.
        task: the served model's task (``sequence-classification`` or ``token-classification``); it decides
            whether pairs are accepted and which options apply.

    Raises:
        ApiError: 400 for malformed JSON, a missing, unknown or mistyped field, a pair sent to a token
            classifier, an option of the other task (the message names the field and the input's index); 413 for
            more than ``max_inputs`` inputs.
        ValueError: ``task`` is not a classifier task.
    """
    if task not in (TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION):
        raise ValueError(f"task must be {TASK_SEQUENCE_CLASSIFICATION!r} or {TASK_TOKEN_CLASSIFICATION!r}, got "
                         f"{task!r}")
    sequence = task == TASK_SEQUENCE_CLASSIFICATION
    own, other = (_SEQUENCE_ONLY, _TOKEN_ONLY) if sequence else (_TOKEN_ONLY, _SEQUENCE_ONLY)
    data = read_object(body, example=_EXAMPLE)
    why = f"it applies to {'token' if sequence else 'sequence'} classifiers, and this model is a {task} model"
    check_fields(data, (*_COMMON, *own), ("input",), dict.fromkeys(other, why))
    zero_shot = sequence and data.get("candidate_labels") is not None
    inputs = _inputs(data["input"], max_inputs, pairs=sequence and not zero_shot,
                     single="zero-shot classification (with 'candidate_labels')" if zero_shot else "a token classifier")
    model = check_model(data)
    if zero_shot:
        return _zero_shot_request(data, inputs, model, max_inputs)
    if sequence:
        for name in _ZERO_SHOT[1:]:
            if data.get(name) is not None:
                raise bad_request(f"field {name!r} applies to zero-shot classification; send it with "
                                  "'candidate_labels'", name)
        return ClassifyRequest(inputs=inputs, model=model, top_k=check_count(data, "top_k"),
                               raw_scores=check_bool(data, "raw_scores", False))
    aggregation = data.get("aggregation")
    aggregation = "first" if aggregation is None else aggregation
    if aggregation not in AGGREGATIONS:
        raise bad_request(f"field 'aggregation' must be one of {', '.join(map(repr, AGGREGATIONS))}, got "
                          f"{aggregation!r}", "aggregation")
    return ClassifyRequest(inputs=inputs, model=model, aggregation=aggregation)


def _zero_shot_request(data: dict[str, Any], inputs: list[Item], model: str | None, max_inputs: int
                       ) -> ClassifyRequest:
    if data.get("raw_scores"):
        raise bad_request("field 'raw_scores' does not apply to zero-shot classification, whose scores come from "
                          "the entailment logits of every label; drop it", "raw_scores")
    value = data["candidate_labels"]
    if isinstance(value, str):
        labels = [label.strip() for label in check_text(value, "candidate_labels").split(",") if label.strip()]
    elif isinstance(value, list):
        labels = [check_text(label, f"candidate_labels[{i}]") for i, label in enumerate(value)]
    else:
        raise bad_request(f"field 'candidate_labels' must be a list of strings or a comma-separated string, got "
                          f"{json_type(value)}", "candidate_labels")
    if not labels:
        raise bad_request("field 'candidate_labels' holds no label; send at least one, e.g. [\"sports\", "
                          "\"politics\"]", "candidate_labels")
    pairs = len(inputs) * len(labels)
    if pairs > max_inputs:
        raise ApiError(413, f"{len(inputs)} input(s) x {len(labels)} candidate label(s) make {pairs} (text, "
                            f"hypothesis) pairs; this server runs at most {max_inputs} per request. Split the inputs "
                            "over several requests.", param="candidate_labels", code="too_many_inputs")
    template = data.get("hypothesis_template")
    template = DEFAULT_HYPOTHESIS_TEMPLATE if template is None else check_text(template, "hypothesis_template")
    try:
        hypotheses(labels, template)
    except ValueError as exc:
        raise bad_request(f"field 'hypothesis_template': {exc}", "hypothesis_template") from exc
    return ClassifyRequest(inputs=inputs, model=model, top_k=check_count(data, "top_k"), candidate_labels=labels,
                           hypothesis_template=template, multi_label=check_bool(data, "multi_label", False))


def _inputs(value: object, limit: int, *, pairs: bool, single: str = "a token classifier") -> list[Item]:
    if isinstance(value, str):
        return [check_text(value, "input")]
    if not isinstance(value, list):
        raise bad_request(f"field 'input' must be a string or a list, got {json_type(value)}", "input")
    if not value:
        raise bad_request("field 'input' is an empty list; send at least one input", "input")
    if len(value) > limit:
        raise too_many("input", len(value), limit, "inputs")
    wanted = 'a string, or a pair: ["text", "text_pair"] or {"text": ..., "text_pair": ...}' if pairs else "a string"
    items: list[Item] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if isinstance(item, str):
            items.append(check_text(item, param))
            continue
        if not pairs and isinstance(item, (list, dict)):
            raise bad_request(f"{param} is a pair; {single} labels single texts. Send each text as a string.",
                              param, "unsupported_value")
        if isinstance(item, list) and len(item) == 2:
            items.append((check_text(item[0], f"{param}[0]"), check_text(item[1], f"{param}[1]")))
        elif isinstance(item, dict) and set(item) == {"text", "text_pair"}:
            items.append((check_text(item["text"], f"{param}.text"),
                          check_text(item["text_pair"], f"{param}.text_pair")))
        else:
            shape = f"a list of {len(item)}" if isinstance(item, list) else json_type(item)
            if isinstance(item, dict):
                shape = f"an object with {', '.join(map(repr, sorted(item))) or 'no fields'}"
            raise bad_request(f"{param} is {shape}; each input must be {wanted}", param)
    return items


def classify_response(scores: np.ndarray, *, labels: Sequence[str], top_k: int | None, token_counts: Sequence[int],
                      model: str) -> dict[str, Any]:
    """The response body of ``POST /v1/classify`` for a sequence classifier.

    Args:
        scores: ``[inputs, labels]``, ``SequenceClassifier.probabilities`` (or ``logits`` for ``raw_scores``).
        labels: label names in column order (``SequenceClassifier.labels``).
        top_k: how many labels to list per input (``None``: all).
        token_counts: tokens the model saw per input (``SequenceClassifier.token_count``), for ``usage``.
        model: the model name to report.

    Raises:
        ValueError: ``scores`` does not have one column per label, or holds a non-finite value.
    """
    values = np.asarray(scores, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(labels):
        raise ValueError(f"expected scores of shape [inputs, {len(labels)}], got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"the model gave non-finite scores for input(s) "
                         f"{np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist()[:10]}")
    columns = np.arange(len(labels))
    # best first, equal scores in label order
    orders = [np.lexsort((columns, -row)).tolist() for row in values]
    return _body(_ranked(values, orders, labels, top_k), token_counts, model)


def zero_shot_response(scores: np.ndarray, *, labels: Sequence[str], top_k: int | None, token_counts: Sequence[int],
                       model: str) -> dict[str, Any]:
    """The response body of a zero-shot ``POST /v1/classify``: ``classify_response``'s shape, the candidate labels
    ordered as transformers' zero-shot pipeline orders them (``zero_shot.label_order``).

    Args:
        scores: ``[inputs, candidate labels]``, ``ZeroShotClassifier.scores``.
        labels: the candidate labels in column order.
        top_k, token_counts, model: as ``classify_response`` (the counts are per (text, hypothesis) pair).
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(labels) or not np.isfinite(values).all():
        raise ValueError(f"expected finite scores of shape [inputs, {len(labels)}], got {values.shape}")
    return _body(_ranked(values, [label_order(row) for row in values], labels, top_k), token_counts, model)


def _ranked(values: np.ndarray, orders: Sequence[Sequence[int]], labels: Sequence[str], top_k: int | None
            ) -> list[dict[str, Any]]:
    data = []
    for index, (row, order) in enumerate(zip(values, orders)):
        listed = [{"label": labels[i], "score": float(row[i])} for i in order[:top_k]]
        data.append({"object": "classification", "index": index, "label": labels[order[0]],
                     "score": float(row[order[0]]), "scores": listed})
    return data


def token_classify_response(spans: Sequence[Sequence[Span]], *, token_counts: Sequence[int],
                            model: str) -> dict[str, Any]:
    """The response body of ``POST /v1/classify`` for a token classifier.

    Args:
        spans: per input, ``TokenClassifier.predict``'s spans.
        token_counts: tokens the model saw per input (``TokenClassifier.token_count``), for ``usage``.
        model: the model name to report.
    """
    data = [{"object": "token_classification", "index": index,
             "spans": [{"label": s.label, "score": float(s.score), "start": s.start, "end": s.end, "text": s.text}
                       for s in item]}
            for index, item in enumerate(spans)]
    return _body(data, token_counts, model)


def _body(data: list[dict[str, Any]], token_counts: Sequence[int], model: str) -> dict[str, Any]:
    tokens = int(sum(token_counts))
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
