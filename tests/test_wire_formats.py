"""The rerank and classify wire formats (runtime/server/rerank_api.py, classify_api.py): request checks on
hand-built bodies, and response bodies built from the library classes' outputs on the tiny classifiers, checked
against those classes (CrossEncoder.rank, SequenceClassifier.predict, TokenClassifier.predict) after a JSON round
trip, as a client would read them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from deberta_onnx.runtime import CrossEncoder, SequenceClassifier, TokenClassifier
from deberta_onnx.runtime.server.classify_api import (
    classify_response,
    parse_classify_request,
    token_classify_response,
)
from deberta_onnx.runtime.server.errors import ApiError
from deberta_onnx.runtime.server.rerank_api import parse_rerank_request, rerank_response

SEQ, TOK = "sequence-classification", "token-classification"
DOCS = ["Paris is the capital of France.", {"text": "The cat sat on the mat."}, "", "capital " * 300,
        {"text": "Zürich liegt am See. 東京"}, "Paris is the capital of France."]


def _body(value: object) -> bytes:
    return json.dumps(value).encode("utf-8")


def _round_trip(body: dict) -> dict:  # type: ignore[type-arg]
    return json.loads(json.dumps(body, allow_nan=False))


def _pair_tokens(folder: Path, items: list) -> list[int]:  # type: ignore[type-arg]
    """Token counts from the folder's tokenizer.json, read here without the runtime."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(512)
    return [len(tokenizer.encode(*((item,) if isinstance(item, str) else item)).ids) for item in items]


@pytest.mark.parametrize(("top_n", "return_documents"), [(None, False), (3, True), (50, True)])
def test_rerank_response_ranks_as_cross_encoder(reranker: tuple[Path, Path], top_n: int | None,
                                                return_documents: bool) -> None:
    _, folder = reranker
    model = CrossEncoder(folder)
    body = {"query": "What is the capital of France?", "documents": DOCS, "model": "rr",
            "return_documents": return_documents, **({"top_n": top_n} if top_n else {})}
    request = parse_rerank_request(_body(body), max_documents=100)
    texts = [d if isinstance(d, str) else d["text"] for d in DOCS]
    assert request.documents == texts and request.pairs()[1] == (body["query"], texts[1])
    scores = model.predict(request.pairs())
    counts = model.token_count(request.pairs())
    assert counts == _pair_tokens(folder, request.pairs())
    out = _round_trip(rerank_response(scores, request=request, token_counts=counts, model="rr"))

    hits = model.rank(body["query"], texts, top_k=top_n)
    assert [r["index"] for r in out["results"]] == [h.index for h in hits]
    assert len(out["results"]) == min(top_n or len(texts), len(texts))
    for result, hit in zip(out["results"], hits):
        assert np.float32(result["relevance_score"]) == np.float32(hit.score)  # exact after JSON
        assert np.float32(result["relevance_score"]) == np.float32(scores[result["index"]])
        assert ("document" in result) is return_documents
        if return_documents:
            assert result["document"] == {"text": texts[result["index"]]}
    ranked = [r["relevance_score"] for r in out["results"]]
    assert ranked == sorted(ranked, reverse=True)
    if top_n is None:  # the two equal documents score alike and keep document order
        order = [r["index"] for r in out["results"]]
        assert scores[0] == scores[5] and order.index(0) == order.index(5) - 1
    assert out["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)} and out["model"] == "rr"


@pytest.mark.parametrize(("body", "status", "param", "fragment"), [
    (b"\xff", 400, None, "not UTF-8"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "nests arrays or objects too deeply"),
    (b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}", 400, None, "number"),
    ({"documents": ["a"]}, 400, "query", "'query' is required"),
    ({"query": "q"}, 400, "documents", "'documents' is required"),
    ({"query": 3, "documents": ["a"]}, 400, "query", "query must be a string"),
    ({"query": "q", "documents": []}, 400, "documents", "empty list"),
    ({"query": "q", "documents": "a"}, 400, "documents", "must be a list"),
    ({"query": "q", "documents": ["a", 7]}, 400, "documents[1]", 'a string or a {"text": ...} object'),
    ({"query": "q", "documents": [{"title": "t", "text": "a"}]}, 400, "documents[0]", "only 'text'"),
    ({"query": "q", "documents": [{}]}, 400, "documents[0]", "without 'text'"),
    ({"query": "q", "documents": [{"text": None}]}, 400, "documents[0].text", "must be a string"),
    ({"query": "q", "documents": ["\ud800"]}, 400, "documents[0]", "unpaired surrogate"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n", "at least 1"),
    ({"query": "q", "documents": ["a"], "top_n": True}, 400, "top_n", "positive integer"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, 400, "return_documents", "true or false"),
    ({"query": "q", "documents": ["a"], "model": 1}, 400, "model", "must be a string"),
    ({"query": "q", "documents": ["a"], "rank_fields": ["text"]}, 400, "rank_fields", "not supported"),
    ({"query": "q", "texts": ["a"]}, 400, "texts", "send the texts to rank as 'documents'"),
    ({"query": "q", "documents": ["a"], "colour": 1}, 400, "colour", "accepted fields are query, documents"),
    ({"query": "q", "documents": ["a"] * 5}, 413, "documents", "at most 4 per request"),
])
def test_rerank_request_errors_name_the_field(body: object, status: int, param: str | None, fragment: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_rerank_request(body if isinstance(body, bytes) else _body(body), max_documents=4)
    assert caught.value.status == status and caught.value.param == param
    assert fragment in caught.value.message
    assert caught.value.body()["error"]["message"] == caught.value.message


def test_rerank_response_refuses_scores_it_cannot_rank() -> None:
    request = parse_rerank_request(_body({"query": "q", "documents": ["a", "b"]}), max_documents=4)
    with pytest.raises(ValueError, match="one score per document"):
        rerank_response(np.zeros((2, 3)), request=request, token_counts=[1, 1], model="m")
    with pytest.raises(ValueError, match=r"non-finite scores for document\(s\) \[1\]"):
        rerank_response(np.array([0.5, np.nan]), request=request, token_counts=[1, 1], model="m")


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_classify_response_equals_sequence_classifier(nli: tuple[Path, Path], top_k: int | None) -> None:
    _, folder = nli
    model = SequenceClassifier(folder)
    body = {"input": ["A man plays a guitar.", ["A man plays a guitar.", "Someone makes music."],
                      {"text": "A dog runs.", "text_pair": "An animal sleeps."}, "", "word " * 400],
            **({"top_k": top_k} if top_k else {})}
    request = parse_classify_request(_body(body), max_inputs=16, task=SEQ)
    assert request.inputs[1] == ("A man plays a guitar.", "Someone makes music.")
    assert request.inputs[2] == ("A dog runs.", "An animal sleeps.")
    counts = model.token_count(request.inputs)
    assert counts == _pair_tokens(folder, request.inputs)
    out = _round_trip(classify_response(model.probabilities(request.inputs), labels=model.labels,
                                        top_k=request.top_k, token_counts=counts, model="nli"))
    predictions = model.predict(request.inputs)
    probabilities = model.probabilities(request.inputs)
    assert [d["index"] for d in out["data"]] == list(range(len(request.inputs)))
    for item, prediction, row in zip(out["data"], predictions, probabilities):
        assert item["label"] == prediction.label and np.float32(item["score"]) == np.float32(prediction.score)
        assert len(item["scores"]) == (top_k or len(model.labels))
        listed = {s["label"]: s["score"] for s in item["scores"]}
        for label, value in listed.items():
            assert np.float32(value) == row[list(model.labels).index(label)]
        assert [s["score"] for s in item["scores"]] == sorted(listed.values(), reverse=True)
    assert out["usage"]["total_tokens"] == sum(counts) and out["object"] == "list"


def test_classify_raw_scores_are_the_logits(nli: tuple[Path, Path]) -> None:
    model = SequenceClassifier(nli[1])
    request = parse_classify_request(_body({"input": "A text.", "raw_scores": True}), max_inputs=4, task=SEQ)
    assert request.raw_scores and request.inputs == ["A text."]
    logits = model.logits(request.inputs)
    out = _round_trip(classify_response(logits, labels=model.labels, top_k=None, token_counts=[3], model="m"))
    best = int(np.argmax(logits[0]))
    assert out["data"][0]["label"] == model.labels[best]
    assert np.float32(out["data"][0]["score"]) == logits[0, best]


@pytest.mark.parametrize("aggregation", ["none", "simple", "first", "average", "max"])
def test_token_classify_response_equals_token_classifier(ner: tuple[Path, Path], aggregation: str) -> None:
    model = TokenClassifier(ner[1])
    texts = ["Ada Lovelace lived in London.", "café naïve Zürich 😀 東京タワー", "", "x " * 600]
    request = parse_classify_request(_body({"input": texts, "aggregation": aggregation}), max_inputs=8, task=TOK)
    assert request.aggregation == aggregation and request.inputs == texts
    spans = model.predict(texts, aggregation=aggregation)
    counts = model.token_count(texts)
    assert counts == _pair_tokens(ner[1], texts)
    out = _round_trip(token_classify_response(spans, token_counts=counts, model="ner"))
    assert len(out["data"]) == len(texts)
    for item, text, expected in zip(out["data"], texts, spans):
        assert len(item["spans"]) == len(expected)
        for got, span in zip(item["spans"], expected):
            assert (got["label"], got["start"], got["end"], got["text"]) == (span.label, span.start, span.end,
                                                                             span.text)
            assert np.float32(got["score"]) == np.float32(span.score)
            assert text[got["start"]:got["end"]] == got["text"]
    assert any(item["spans"] for item in out["data"])  # the random head labels something
    assert out["usage"]["prompt_tokens"] == sum(counts)


@pytest.mark.parametrize(("body", "task", "status", "param", "fragment"), [
    ({"input": [["a", "b"]]}, TOK, 400, "input[0]", "token classifier labels single texts"),
    ({"input": ["a"], "top_k": 2}, TOK, 400, "top_k", "applies to sequence classifiers"),
    ({"input": ["a"], "aggregation": "first"}, SEQ, 400, "aggregation", "applies to token classifiers"),
    ({"input": ["a"], "aggregation": "mean"}, TOK, 400, "aggregation", "'none', 'simple', 'first'"),
    ({"input": []}, SEQ, 400, "input", "empty list"),
    ({"input": 5}, SEQ, 400, "input", "a string or a list"),
    ({"input": [["a", "b", "c"]]}, SEQ, 400, "input[0]", "a list of 3"),
    ({"input": [{"text": "a"}]}, SEQ, 400, "input[0]", "an object with 'text'"),
    ({"input": [["a", 1]]}, SEQ, 400, "input[0][1]", "must be a string"),
    ({"input": ["a"], "raw_scores": 1}, SEQ, 400, "raw_scores", "true or false"),
    ({"input": ["a"], "top_k": -1}, SEQ, 400, "top_k", "at least 1"),
    ({"texts": ["a"]}, SEQ, 400, "texts", "accepted fields are input, model, top_k, raw_scores"),
    ({"input": ["a"] * 9}, SEQ, 413, "input", "holds 9 inputs"),
])
def test_classify_request_errors_name_the_field(body: object, task: str, status: int, param: str,
                                                fragment: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_classify_request(_body(body), max_inputs=8, task=task)
    assert caught.value.status == status and caught.value.param == param
    assert fragment in caught.value.message


def test_classify_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="task must be"):
        parse_classify_request(_body({"input": "a"}), max_inputs=4, task="embedding")
    with pytest.raises(ValueError, match=r"shape \[inputs, 3\]"):
        classify_response(np.zeros((2, 2)), labels=["a", "b", "c"], top_k=None, token_counts=[1, 1], model="m")
    with pytest.raises(ValueError, match=r"non-finite scores for input\(s\) \[0\]"):
        classify_response(np.array([[np.inf, 0.0]]), labels=["a", "b"], top_k=None, token_counts=[1], model="m")


# --- the task routes: question answering, multiple choice, fill-mask (docs/errors-and-limits.md, "The task models")

def _parse_task_request(route: str, body: bytes) -> object:
    from deberta_onnx.runtime.server.qa_api import parse_qa_request
    from deberta_onnx.runtime.server.tasks_api import parse_fill_mask_request, parse_multiple_choice_request

    if route == "qa":
        return parse_qa_request(body, max_inputs=4)
    if route == "choice":
        return parse_multiple_choice_request(body, max_inputs=5)
    return parse_fill_mask_request(body, max_inputs=5, mask_token="[MASK]")


@pytest.mark.parametrize(("route", "body", "status", "param", "fragment"), [
    ("qa", {"question": "q?"}, 400, "context", "'context' is required"),
    ("qa", {"question": "q?", "context": ""}, 400, "context", "context 0 is empty"),
    ("qa", {"question": ["q?", ""], "context": "c"}, 400, "question", "question 1 is empty"),
    ("qa", {"question": "q?", "context": ["a", "b"]}, 400, "context", "is ambiguous"),
    ("qa", {"question": ["a?", "b?"], "context": ["c"]}, 400, "context", "1 contexts for 2 questions"),
    ("qa", {"question": [], "context": "c"}, 400, "question", "non-empty list"),
    ("qa", {"question": "q?", "context": "c", "doc_stride": -1}, 400, "doc_stride", "integer >= 0"),
    ("qa", {"question": "q?", "context": "c", "max_answer_len": 0}, 400, "max_answer_len", "at least 1"),
    ("qa", {"question": "q?", "context": "c", "handle_impossible_answer": "yes"}, 400, "handle_impossible_answer",
     "true or false"),
    ("qa", {"question": ["q?"] * 5, "context": "c"}, 413, "question", "at most 4"),
    ("choice", {"input": []}, 400, "input", "an empty list"),
    ("choice", {"input": {"prompt": "q", "choices": []}}, 400, "input.choices", "non-empty list"),
    ("choice", {"input": [{"prompt": "q", "choices": ["a"]}, {"prompt": "q"}]}, 400, "input[1]",
     "an object with 'prompt'"),
    ("choice", {"input": [{"prompt": "q", "choices": ["a", 2]}]}, 400, "input[0].choices[1]", "must be a string"),
    ("choice", {"input": [{"prompt": "q", "choices": ["a", "b", "c"]}] * 2}, 413, "input",
     "6 (prompt, choice) pairs"),
    ("mask", {"input": "no mask"}, 400, "input", "has no mask token [MASK]"),
    ("mask", {"input": ["a [MASK]", "none"]}, 400, "input[1]", "has no mask token [MASK]"),
    ("mask", {"input": "a [MASK]", "targets": []}, 400, "targets", "non-empty list"),
    ("mask", {"input": "a [MASK]", "top_k": 0}, 400, "top_k", "at least 1"),
    ("mask", {"input": ["a [MASK]"] * 6}, 413, "input", "at most 5"),
])
def test_task_request_errors_name_the_field(route: str, body: object, status: int, param: str,
                                            fragment: str) -> None:
    """The question-answering, multiple-choice and fill-mask bodies, parsed without a model."""
    with pytest.raises(ApiError) as caught:
        _parse_task_request(route, _body(body))
    assert (caught.value.status, caught.value.param) == (status, param), caught.value.message
    assert fragment in caught.value.message


def test_question_answering_limits_need_the_model(qa: tuple[Path, Path], corpus: list[str]) -> None:
    """What the route checks against the loaded model before queueing: the windows a long context makes count
    against max_inputs; a window over the model's maximum and a question that leaves no room for its context are
    400s naming what to change."""
    from deberta_onnx.runtime import QuestionAnswerer
    from deberta_onnx.runtime.server.config import ServerConfig
    from deberta_onnx.runtime.server.models import QUESTION_ANSWERING, ServedModel

    served = ServedModel(QuestionAnswerer(qa[1]), "qa", ServerConfig(max_inputs=4))
    cases = [({"question": "Where?", "context": " ".join(corpus * 2)}, 413, "context", "windows of"),
             ({"question": "Where?", "context": "c", "max_seq_len": 100_000}, 400, None, "over the model's maximum"),
             ({"question": "Where?", "context": "c", "max_seq_len": 64, "doc_stride": 64}, 400, None,
              "doc_stride (64) must be less than max_seq_len"),
             ({"question": " ".join(corpus[:30]), "context": "c"}, 400, "question", "Shorten the question")]
    for body, status, param, fragment in cases:
        with pytest.raises(ApiError) as caught:
            served.job(QUESTION_ANSWERING, _body(body))
        assert (caught.value.status, caught.value.param) == (status, param), caught.value.message
        assert fragment in caught.value.message
    job = served.job(QUESTION_ANSWERING, _body({"question": ["Where?", "Who?"], "context": corpus[3]}))
    assert len(job.items) == 2  # one window per short context
    # A context of spaces only has no token to answer with: the pipeline's empty answer, as the library gives it.
    job = served.job(QUESTION_ANSWERING, _body({"question": "Where?", "context": "   "}))
    outputs: list[object] = [None] * len(job.items)
    for call in served.model.plan(job.items):
        for row, window in zip(call.rows, call.run()):
            outputs[row] = window
    body = job.answer(outputs, [1] * len(outputs))
    assert body["data"][0]["answers"] == [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
