"""The models one server serves: each exported folder loaded for its task, with its own micro-batcher, and what
each route does with it (parse the body, name the inputs to run, shape the answer). Standard library + numpy
above the runtime; no HTTP stack, so that it can be tested, and reused, without a server.

Routes per task: an ``embedding`` model serves ``POST /v1/embeddings``; a ``sequence-classification`` model
(classifier or cross-encoder) serves ``POST /v1/rerank`` (one-label models) and ``POST /v1/classify`` (zero-shot
with ``candidate_labels`` where its labels name entailment); a
``token-classification`` model serves ``POST /v1/classify`` with spans; a ``question-answering`` model serves
``POST /v1/question-answering`` (each question's context cut into windows, the windows micro-batched); a
``multiple-choice`` model ``POST /v1/multiple-choice``, a ``fill-mask`` model ``POST /v1/fill-mask`` (``tasks_api``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import capped
from ..classifier import SequenceClassifier, TokenClassifier
from ..config import EncoderConfig
from ..contract import (
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
)
from ..encoder import Encoder
from ..errors import TaskMismatchError
from ..fill_mask import FillMask, fill_mask_candidates
from ..manifest import load_manifest
from ..multiple_choice import MultipleChoice, MultipleChoiceResult, choice_scores
from ..postprocess import classifier_scores, cross_encoder_scores, truncate_dimensions
from ..question_answering import QuestionAnswerer
from ..zero_shot import entailment_index, zero_shot_scores
from .budget import TokenBudget
from .classify_api import (
    ClassifyRequest,
    classify_response,
    parse_classify_request,
    token_classify_response,
    zero_shot_response,
)
from .config import ServerConfig
from .errors import ApiError
from .microbatch import BatchObserver, MicroBatcher, Outputs
from .openai_api import embedding_response, parse_embedding_request
from .qa_api import parse_qa_request, qa_response
from .rerank_api import parse_rerank_request, rerank_response
from .tasks_api import (
    fill_mask_response,
    multiple_choice_response,
    parse_fill_mask_request,
    parse_multiple_choice_request,
)

__all__ = ["CLASSIFY", "EMBEDDINGS", "FILL_MASK", "MULTIPLE_CHOICE", "QUESTION_ANSWERING", "RERANK", "ROUTES", "Job",
           "Model", "ServedModel", "load_folder"]

Model = Encoder | SequenceClassifier | TokenClassifier | QuestionAnswerer | MultipleChoice | FillMask

EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"
CLASSIFY = "/v1/classify"
QUESTION_ANSWERING = "/v1/question-answering"
MULTIPLE_CHOICE = "/v1/multiple-choice"
FILL_MASK = "/v1/fill-mask"
# The model routes each task serves.
ROUTES = {
    TASK_EMBEDDING: (EMBEDDINGS,),
    TASK_SEQUENCE_CLASSIFICATION: (RERANK, CLASSIFY),
    TASK_TOKEN_CLASSIFICATION: (CLASSIFY,),
    TASK_QUESTION_ANSWERING: (QUESTION_ANSWERING,),
    TASK_MULTIPLE_CHOICE: (MULTIPLE_CHOICE,),
    TASK_FILL_MASK: (FILL_MASK,),
}
_KINDS: dict[str, type[Model]] = {
    TASK_EMBEDDING: Encoder,
    TASK_SEQUENCE_CLASSIFICATION: SequenceClassifier,
    TASK_TOKEN_CLASSIFICATION: TokenClassifier,
    TASK_QUESTION_ANSWERING: QuestionAnswerer,
    TASK_MULTIPLE_CHOICE: MultipleChoice,
    TASK_FILL_MASK: FillMask,
}


def load_folder(model_dir: str | Path, config: EncoderConfig | None = None) -> Model:
    """Loads an exported folder with the class of its task: ``Encoder``, ``SequenceClassifier`` (also what a
    cross-encoder's rerank scores are computed from) or ``TokenClassifier``.

    Raises:
        ModelFolderError: the folder or its manifest is missing or bad (and the loading errors of ``Encoder``).
        TaskMismatchError: the folder holds a task this server cannot serve.
    """
    manifest = load_manifest(model_dir)
    kind = _KINDS.get(manifest.task)
    if kind is None:
        raise TaskMismatchError(f"{model_dir} holds a model of task {manifest.task!r}; the server serves "
                                f"{', '.join(_KINDS)} models. Export the checkpoint with one of those --task values.")
    return kind(model_dir, config=config or EncoderConfig())


@dataclass(frozen=True, kw_only=True)
class Job:
    """A checked request: the inputs to run through the model, and how to answer once their outputs are back.

    Attributes:
        items: texts, or ``(text, text_pair)`` pairs, as the model's ``plan`` takes them.
        answer: (outputs in input order, token counts) -> the response body; called in a worker thread, off the
            event loop.
    """

    items: list[Any]
    answer: Callable[[Outputs, list[int]], dict[str, Any]]


class ServedModel:
    """One served folder: its model, its name, the routes it serves and its micro-batcher.

    Args:
        model: the loaded model (``load_folder``); only the batcher's worker thread runs it.
        name: the model id the server reports and routes by.
        config: batching and limits.
        observer: told of the batcher's queue waits and model calls (metrics), or ``None``.
    """

    def __init__(self, model: Model, name: str, config: ServerConfig, observer: BatchObserver | None = None) -> None:
        self.model = model
        self.name = name
        self.config = config
        self.task = model.manifest.task
        self.routes = ROUTES[self.task]
        self.provider = model.loaded.provider
        budget = None
        if config.max_batch_tokens is not None:
            budget = TokenBudget(max_texts=config.max_batch_size, max_padded_tokens=config.max_batch_tokens,
                                 batch_size=config.batch_size,
                                 policy=capped(model.loaded.policy, config.max_call_tokens),
                                 max_length=model.max_length)
        batch_size = config.batch_size
        call_tokens = config.max_call_tokens
        self.batcher = MicroBatcher(lambda items: model.plan(items, batch_size, max_tokens=call_tokens),
                                    max_batch_size=config.max_batch_size,
                                    max_wait_s=config.max_wait_ms / 1000, max_queue=config.max_queue, budget=budget,
                                    observer=observer, release_tokens=model.loaded.shrink_tokens)

    def describe(self) -> dict[str, Any]:
        """What ``/health`` and ``/v1/models`` say of this model."""
        model = self.model
        info: dict[str, Any] = {"model": self.name, "task": self.task, "routes": list(self.routes),
                                "model_dir": str(model.model_dir), "precision": model.precision,
                                "precision_reason": model.precision_reason, "provider": self.provider,
                                "engine": model.engine, "engine_reason": model.engine_reason,
                                "max_length": model.max_length}
        if isinstance(model, Encoder):
            info["hidden_size"] = model.hidden_size
        elif isinstance(model, FillMask):
            info["mask_token"] = model.mask_token
        elif not isinstance(model, (MultipleChoice, QuestionAnswerer)):
            info["labels"] = list(model.labels)
        return info

    def token_counts(self, items: list[Any]) -> list[int]:
        """Tokens the model sees per input (for the token budget)."""
        return self.model.token_count(items)

    def job(self, route: str, body: bytes, *, echo: bool = False) -> Job:
        """Parses ``body`` for ``route``.

        Args:
            route: one of ``self.routes``.
            body: the raw request body.
            echo: answer with the request's own ``model`` when it names one (a server of one model, as OpenAI's
                clients expect); else with ``self.name``.

        Raises:
            ApiError: the body is malformed (400, naming the field), too large (413), or asks this model for what
                it cannot give (rerank on a model of several labels: 400).
        """
        config = self.config
        model = self.model
        if isinstance(model, Encoder):
            return self._embeddings(model, body, echo)
        if isinstance(model, MultipleChoice):
            return self._multiple_choice(body, echo)
        if isinstance(model, FillMask):
            return self._fill_mask(model, body, echo)
        if isinstance(model, QuestionAnswerer):
            return self._question_answering(model, body, echo)
        if route == RERANK and isinstance(model, SequenceClassifier):
            return self._rerank(model, body, echo)
        parsed = parse_classify_request(body, max_inputs=config.max_inputs, task=self.task)
        name = self._name(parsed.model, echo)
        if isinstance(model, TokenClassifier):
            texts: list[str] = parsed.inputs  # type: ignore[assignment]  # the parser refuses pairs here

            def spans(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
                found = [model.spans(text, output, aggregation=parsed.aggregation)
                         for text, output in zip(texts, outputs)]
                return token_classify_response(found, token_counts=counts, model=name)

            return Job(items=texts, answer=spans)
        if parsed.candidate_labels is not None:
            return self._zero_shot(model, parsed, name)
        labels = list(model.labels)
        problem_type = model.manifest.model.problem_type

        def classes(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            logits = np.asarray(outputs)
            scores = logits if parsed.raw_scores else classifier_scores(logits, problem_type=problem_type,
                                                                        labels=len(labels))
            return classify_response(scores, labels=labels, top_k=parsed.top_k, token_counts=counts, model=name)

        return Job(items=list(parsed.inputs), answer=classes)

    def _question_answering(self, model: QuestionAnswerer, body: bytes, echo: bool) -> Job:
        limit = self.config.max_inputs
        parsed = parse_qa_request(body, max_inputs=limit)
        name = self._name(parsed.model, echo)
        try:
            options = model.options(**parsed.options)
        except (TypeError, ValueError) as exc:  # e.g. max_seq_len over the model's maximum
            raise ApiError(400, str(exc), param=None, code="invalid_value") from exc
        try:
            windows, owners = model.pair_windows(parsed.pairs, options)
        except ValueError as exc:  # a question too long to leave room for its context
            raise ApiError(400, str(exc), param="question", code="invalid_value") from exc
        if len(windows) > limit:
            raise ApiError(413, f"the contexts make {len(windows)} windows of {options.max_seq_len} tokens; this "
                                f"server runs at most {limit} per request. Send shorter contexts or fewer questions.",
                           param="context", code="too_many_inputs")

        def answer(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            found = [model.answers(context, [outputs[row] for row in rows], options)
                     for (_, context), rows in zip(parsed.pairs, owners)]
            return qa_response(found, token_counts=counts, model=name)

        return Job(items=windows, answer=answer)

    def _zero_shot(self, model: SequenceClassifier, parsed: ClassifyRequest, name: str) -> Job:
        try:
            entailment = entailment_index(model.labels, self.name)
        except TaskMismatchError as exc:
            raise ApiError(400, f"model {self.name!r} cannot do zero-shot classification: {exc}",
                           param="candidate_labels", code="unsupported_model") from exc
        labels = parsed.candidate_labels or []
        pairs = parsed.pairs()

        def answer(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            logits = np.asarray(outputs).reshape(len(parsed.inputs), len(labels), -1)
            scores = zero_shot_scores(logits, entailment=entailment, multi_label=parsed.multi_label)
            return zero_shot_response(scores, labels=labels, top_k=parsed.top_k, token_counts=counts, model=name)

        return Job(items=list(pairs), answer=answer)

    def _multiple_choice(self, body: bytes, echo: bool) -> Job:
        parsed = parse_multiple_choice_request(body, max_inputs=self.config.max_inputs)
        name = self._name(parsed.model, echo)

        def answer(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            results = [MultipleChoiceResult(prompt, choices, [float(s) for s in scores], int(scores.argmax()),
                                            choices[int(scores.argmax())])
                       for (prompt, choices), scores in zip(parsed.questions, map(choice_scores, outputs))]
            return multiple_choice_response(results, token_counts=counts, model=name)

        return Job(items=list(parsed.questions), answer=answer)

    def _fill_mask(self, model: FillMask, body: bytes, echo: bool) -> Job:
        parsed = parse_fill_mask_request(body, max_inputs=self.config.max_inputs, mask_token=model.mask_token)
        name = self._name(parsed.model, echo)
        try:  # a mask past the model's maximum is cut off with the text's end: refused here, not in a model call
            model.check_masks(parsed.texts, name="input")
        except ValueError as exc:
            raise ApiError(400, str(exc), param="input", code="invalid_value") from exc
        try:
            targets = None if parsed.targets is None else np.asarray(model.target_ids(parsed.targets))
        except ValueError as exc:
            raise ApiError(400, f"field 'targets': {exc}", param="targets", code="invalid_value") from exc

        def answer(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            answers = []
            for logits, token_ids in outputs:
                found = fill_mask_candidates(logits, token_ids, model, top_k=parsed.top_k, target_ids=targets)
                answers.append(found if len(logits) > 1 else [found])
            return fill_mask_response(answers, token_counts=counts, model=name)

        return Job(items=list(parsed.texts), answer=answer)

    def _name(self, requested: str | None, echo: bool) -> str:
        return requested if echo and requested else self.name

    def _embeddings(self, model: Encoder, body: bytes, echo: bool) -> Job:
        config = self.config
        parsed = parse_embedding_request(body, max_inputs=config.max_inputs, hidden_size=model.hidden_size)
        name = self._name(parsed.model, echo)
        graph_normalizes = model.manifest.normalize

        def answer(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            vectors = truncate_dimensions(np.asarray(outputs), parsed.dimensions, normalize=config.normalize,
                                          graph_normalizes=graph_normalizes)
            return embedding_response(vectors, token_counts=counts, encoding_format=parsed.encoding_format,
                                      model=name)

        return Job(items=parsed.texts, answer=answer)

    def _rerank(self, model: SequenceClassifier, body: bytes, echo: bool) -> Job:
        if len(model.labels) != 1:
            raise ApiError(400, f"model {self.name!r} has {len(model.labels)} labels ({', '.join(model.labels)}); "
                                "rerank needs a one-label cross-encoder. Use POST /v1/classify for this model.",
                           param="model", code="unsupported_model")
        parsed = parse_rerank_request(body, max_documents=self.config.max_inputs)
        name = self._name(parsed.model, echo)
        activation = model.manifest.model.score_activation

        def answer(outputs: Outputs, counts: list[int]) -> dict[str, Any]:
            # CrossEncoder.predict's scores: the saved activation of the one logit.
            scores = cross_encoder_scores(np.asarray(outputs), activation, labels=1)[:, 0]
            return rerank_response(scores, request=parsed, token_counts=counts, model=name)

        return Job(items=parsed.pairs(), answer=answer)
