"""The rerank wire format (``POST /v1/rerank``), in the shape of Cohere's and Jina's rerank APIs. Standard
library + numpy; kept apart from the HTTP stack so that it can be tested, and reused, without a server.

Request::

    {"query": "...", "documents": ["...", {"text": "..."}], "top_n": 3, "return_documents": false, "model": "..."}

Response, best first (equal scores in document order)::

    {"model": "...", "results": [{"index": 1, "relevance_score": 0.93, "document": {"text": "..."}}, ...],
     "usage": {"prompt_tokens": 42, "total_tokens": 42}}

Where the APIs differ: ``documents`` takes strings or ``{"text": ...}`` objects (Cohere v1 and Jina; Cohere v2
takes strings only); ``return_documents`` defaults to false (Cohere, and text-embeddings-inference's
``return_text``; Jina defaults to true); ``usage`` counts the tokens the model saw (Jina's ``usage``, OpenAI's
names; Cohere reports ``meta.billed_units`` instead). text-embeddings-inference's own ``/rerank`` (``texts``,
``raw_scores``, a bare list of ``{index, score}``) is not followed: the Cohere/Jina shape is the one their
clients, and the rerank integrations written against them, send and read. ``relevance_score`` is
``CrossEncoder.predict``'s score: the model's saved activation, else the sigmoid of its one logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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

__all__ = ["RerankRequest", "parse_rerank_request", "rerank_response"]

_FIELDS = ("query", "documents", "top_n", "return_documents", "model")
_UNSUPPORTED = {
    "rank_fields": "documents are {\"text\": ...} objects or strings; send the text to rank in 'text'",
    "max_chunks_per_doc": "a document longer than the model's maximum length is truncated, not chunked",
    "max_tokens_per_doc": "a (query, document) pair longer than the model's maximum length is truncated, "
                          "longest text first",
    "texts": "this is the Cohere/Jina rerank shape: send the texts to rank as 'documents'",
}
_EXAMPLE = '{"query": "a question", "documents": ["a text", ...]}'


@dataclass(frozen=True, kw_only=True)
class RerankRequest:
    """A checked ``POST /v1/rerank`` body.

    Attributes:
        query: the text every document is scored against.
        documents: the documents' texts, in request order.
        top_n: how many results to return (``None``: all); more than there are documents returns all.
        return_documents: echo each result's text as ``document: {"text": ...}``.
        model: the model the client named, or ``None``.
    """

    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    model: str | None

    def pairs(self) -> list[tuple[str, str]]:
        """The ``(query, document)`` pairs to score, in document order (``CrossEncoder.predict``'s input)."""
        return [(self.query, document) for document in self.documents]


def parse_rerank_request(body: bytes, *, max_documents: int) -> RerankRequest:
    """Parses and checks a rerank request body.

    Args:
        body: the raw request body (UTF-8 JSON).
        max_documents: the most documents one request may carry.

    Returns:
        The request, with every document as its text.

    Raises:
        ApiError: 400 for malformed JSON or a missing, unknown or mistyped field (the message names it, and the
            index of a bad document); 413 for more than ``max_documents`` documents.
    """
    data = read_object(body, example=_EXAMPLE)
    check_fields(data, _FIELDS, ("query", "documents"), _UNSUPPORTED)
    query = check_text(data["query"], "query")
    documents = _documents(data["documents"], max_documents)
    model = check_model(data)
    return RerankRequest(query=query, documents=documents, top_n=check_count(data, "top_n"),
                         return_documents=check_bool(data, "return_documents", False), model=model)


def _documents(value: object, limit: int) -> list[str]:
    if not isinstance(value, list):
        raise bad_request(f"field 'documents' must be a list of strings or {{\"text\": ...}} objects, got "
                          f"{json_type(value)}", "documents")
    if not value:
        raise bad_request("field 'documents' is an empty list; send at least one document", "documents")
    if len(value) > limit:
        raise too_many("documents", len(value), limit, "documents")
    texts = []
    for index, item in enumerate(value):
        param = f"documents[{index}]"
        if isinstance(item, dict):
            extra = sorted(set(item) - {"text"})
            if extra:
                raise bad_request(f"{param} has field(s) {', '.join(map(repr, extra))}; a document object holds "
                                  "only 'text'", param)
            if "text" not in item:
                raise bad_request(f"{param} is an object without 'text'; send {{\"text\": \"...\"}}", param,
                                  "missing_field")
            texts.append(check_text(item["text"], f"{param}.text"))
        else:
            texts.append(check_text(item, param, 'a string or a {"text": ...} object'))
    return texts


def rerank_response(scores: np.ndarray, *, request: RerankRequest, token_counts: Sequence[int],
                    model: str) -> dict[str, Any]:
    """The response body of ``POST /v1/rerank``: results best first, the ``request.top_n`` best if given.

    Args:
        scores: one score per document, in document order (``CrossEncoder.predict`` of ``request.pairs()``).
        request: the parsed request.
        token_counts: tokens the model saw per pair (``CrossEncoder.token_count``), for ``usage``.
        model: the model name to report.

    Raises:
        ValueError: ``scores`` is not one finite value per document.
    """
    values = np.asarray(scores, dtype=np.float32)
    if values.shape != (len(request.documents),):
        raise ValueError(f"expected one score per document ({len(request.documents)}), got shape {values.shape}; "
                         "rerank needs a one-label cross-encoder")
    if not np.isfinite(values).all():
        raise ValueError(f"the model gave non-finite scores for document(s) "
                         f"{np.flatnonzero(~np.isfinite(values)).tolist()[:10]}")
    # Best first, equal scores in document order: as CrossEncoder.rank orders them.
    order = np.lexsort((np.arange(len(values)), -values))[: request.top_n]
    results: list[dict[str, Any]] = []
    for index in order.tolist():
        result: dict[str, Any] = {"index": index, "relevance_score": float(values[index])}
        if request.return_documents:
            result["document"] = {"text": request.documents[index]}
        results.append(result)
    tokens = int(sum(token_counts))
    return {"model": model, "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
