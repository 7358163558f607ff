"""`deberta-onnx serve` of several folders at once: embeddings, rerank and classify over real HTTP (a uvicorn
subprocess on loopback, httpx), every answer compared with the library class run here; routing by `model`;
`GET /metrics` parsed with prometheus_client's own parser; token-budget batching.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deberta_onnx.benchmarks.load import RERANK_QUERIES, rerank_scores, run_load
from deberta_onnx.runtime import CrossEncoder, Encoder, SequenceClassifier, TokenClassifier
from deberta_onnx.runtime.batching import padded_tokens
from deberta_onnx.runtime.server.testing import ServerProcess, decode_embeddings

from .conftest import HARD_TEXTS, NLI_LABELS

_THREADS = ("--threads", "1")
QUERY = "Where do the trains to the coast leave from?"
DOCUMENTS = ["The coastal line departs from platform four.", "Bananas are rich in potassium.",
             "Tickets can be bought on board.", "", "The station opened in 1890 and was rebuilt twice."]
NER_TEXTS = ["Ada Lovelace lived in London.", "Grace Hopper worked in Arlington and New York.", "nothing here"]


def _copy(folder: Path, root: Path, name: str) -> Path:
    """A copy named ``name``: the server routes by folder name, and the fixtures' folders are all 'model'."""
    return Path(shutil.copytree(folder, root / name))


@pytest.fixture(scope="module")
def folders(tiny_model: Path, reranker: tuple[Path, Path], nli: tuple[Path, Path], ner: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    return {"embed": _copy(tiny_model, root, "embed"), "rerank": _copy(reranker[1], root, "rerank"),
            "nli": _copy(nli[1], root, "nli"), "ner": _copy(ner[1], root, "ner")}


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[ServerProcess]:
    with ServerProcess(list(folders.values()), *_THREADS, "--max-inputs", "64") as process:
        yield process
        assert process.stop(signal.SIGTERM) == 0, process.log


def _post(server: ServerProcess, route: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def _ok(server: ServerProcess, route: str, body: Any) -> dict[str, Any]:
    response = _post(server, route, body)
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def test_models_lists_every_folder_with_its_task_and_routes(server: ServerProcess) -> None:
    data = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert {m["id"]: (m["task"], m["routes"]) for m in data} == {
        "embed": ("embedding", ["/v1/embeddings"]),
        "rerank": ("sequence-classification", ["/v1/rerank", "/v1/classify"]),
        "nli": ("sequence-classification", ["/v1/rerank", "/v1/classify"]),
        "ner": ("token-classification", ["/v1/classify"]),
    }
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert [m["model"] for m in health["models"]] == ["embed", "rerank", "nli", "ner"]
    assert health["models"][2]["labels"] == NLI_LABELS


def test_rerank_scores_equal_cross_encoder_predict(server: ServerProcess, folders: dict[str, Path]) -> None:
    cross = CrossEncoder(folders["rerank"])
    expected = np.asarray(cross.predict([(QUERY, d) for d in DOCUMENTS]))
    documents: list[Any] = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]]
    body = _ok(server, "/v1/rerank", {"model": "rerank", "query": QUERY, "documents": documents,
                                      "return_documents": True})
    results = body["results"]
    assert [r["index"] for r in results] == [h.index for h in cross.rank(QUERY, DOCUMENTS)]
    for result in results:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-5)
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert body["model"] == "rerank"
    tokens = sum(cross.token_count([(QUERY, d) for d in DOCUMENTS]))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    top = _ok(server, "/v1/rerank", {"model": "rerank", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in top["results"])


def test_classify_scores_equal_the_sequence_classifier(server: ServerProcess, folders: dict[str, Path]) -> None:
    classifier = SequenceClassifier(folders["nli"])
    inputs: list[Any] = ["a single text", ["a premise", "a hypothesis"], {"text": "one", "text_pair": "two"},
                         *HARD_TEXTS[:3]]
    items: list[Any] = ["a single text", ("a premise", "a hypothesis"), ("one", "two"), *HARD_TEXTS[:3]]
    body = _ok(server, "/v1/classify", {"model": "nli", "input": inputs})
    probabilities = classifier.probabilities(items)
    assert [d["index"] for d in body["data"]] == list(range(len(items)))
    for row, item in zip(probabilities, body["data"]):
        by_label = {s["label"]: s["score"] for s in item["scores"]}
        assert sorted(by_label) == sorted(NLI_LABELS)
        np.testing.assert_allclose([by_label[label] for label in NLI_LABELS], row, atol=1e-5)
        assert item["label"] == NLI_LABELS[int(row.argmax())]
    raw = _ok(server, "/v1/classify", {"model": "nli", "input": inputs, "raw_scores": True, "top_k": 1})
    logits = classifier.logits(items)
    for row, item in zip(logits, raw["data"]):
        assert [s["label"] for s in item["scores"]] == [NLI_LABELS[int(row.argmax())]]
        assert item["score"] == pytest.approx(float(row.max()), abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(classifier.token_count(items))


def test_classify_on_a_token_classifier_gives_its_spans(server: ServerProcess, folders: dict[str, Path]) -> None:
    classifier = TokenClassifier(folders["ner"])
    for aggregation in ("first", "max"):
        body = _ok(server, "/v1/classify", {"model": "ner", "input": NER_TEXTS, "aggregation": aggregation})
        expected = classifier.predict(NER_TEXTS, aggregation=aggregation)
        for item, spans in zip(body["data"], expected):
            got = item["spans"]
            assert [(s["label"], s["start"], s["end"], s["text"]) for s in got] == [
                (s.label, s.start, s.end, s.text) for s in spans]
            np.testing.assert_allclose([s["score"] for s in got], [s.score for s in spans], atol=1e-5)


def test_embeddings_go_to_the_one_embedding_model(server: ServerProcess, folders: dict[str, Path]) -> None:
    expected = Encoder(folders["embed"]).encode(DOCUMENTS, normalize=True)
    for body in ({"input": DOCUMENTS}, {"input": DOCUMENTS, "model": "embed"}):
        answer = _ok(server, "/v1/embeddings", body)
        np.testing.assert_allclose(decode_embeddings(answer), expected, atol=1e-5)
        assert answer["model"] == "embed"


def test_routing_errors_name_the_models_served(server: ServerProcess) -> None:
    message = _error(_post(server, "/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}), 404,
                     "model_not_found")
    assert all(f"'{name}'" in message for name in ("embed", "rerank", "nli", "ner"))
    message = _error(_post(server, "/v1/classify", {"input": ["x"]}), 400, "model_required")
    assert "'nli'" in message and "'ner'" in message and "'embed'" not in message
    message = _error(_post(server, "/v1/embeddings", {"model": "rerank", "input": ["x"]}), 400, "unsupported_task")
    assert "'embed'" in message
    message = _error(_post(server, "/v1/rerank", {"model": "nli", "query": "q", "documents": ["d"]}), 400,
                     "unsupported_model")
    assert "/v1/classify" in message
    _error(_post(server, "/v1/classify", {"model": "ner", "input": [["a", "pair"]]}), 400, "unsupported_value")
    _error(_post(server, "/v1/rerank", {"model": "rerank", "query": "q", "documents": ["d"] * 65}), 413,
           "too_many_inputs")


def _families(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _value(family: Any, sample_name: str, **labels: str) -> float:
    return sum(s.value for s in family.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_parse_and_count_what_the_server_did(server: ServerProcess) -> None:
    before = _families(server)
    requests_before = _value(before["deberta_onnx_requests"], "deberta_onnx_requests_total", route="/v1/rerank",
                             status="200")
    texts_before = _value(before["deberta_onnx_batch_texts"], "deberta_onnx_batch_texts_sum", model="rerank")
    _ok(server, "/v1/rerank", {"model": "rerank", "query": QUERY, "documents": DOCUMENTS})
    _error(_post(server, "/v1/rerank", {"model": "rerank", "query": "q", "documents": ["d"] * 65}), 413,
           "too_many_inputs")
    after = _families(server)
    assert _value(after["deberta_onnx_requests"], "deberta_onnx_requests_total", route="/v1/rerank",
                  status="200") == requests_before + 1
    assert _value(after["deberta_onnx_requests"], "deberta_onnx_requests_total", route="/v1/rerank",
                  status="413") >= 1
    assert _value(after["deberta_onnx_rejections"], "deberta_onnx_rejections_total", reason="too_many_inputs") >= 1
    assert _value(after["deberta_onnx_batch_texts"], "deberta_onnx_batch_texts_sum",
                  model="rerank") == texts_before + len(DOCUMENTS)
    tokens = _value(after["deberta_onnx_batch_tokens"], "deberta_onnx_batch_tokens_sum", model="rerank")
    padded = _value(after["deberta_onnx_batch_padded_tokens"], "deberta_onnx_batch_padded_tokens_sum",
                    model="rerank")
    assert 0 < tokens <= padded
    info = {s.labels["model"]: s.labels["task"] for s in after["deberta_onnx_model_info"].samples}
    assert info == {"embed": "embedding", "rerank": "sequence-classification", "nli": "sequence-classification",
                    "ner": "token-classification"}
    assert _value(after["deberta_onnx_queue_texts"], "deberta_onnx_queue_texts", model="embed") == 0
    assert "deberta_onnx_request_duration_seconds" in after and "process_resident_memory_bytes" in after
    for name in ("deberta_onnx_timeouts", "deberta_onnx_queue_wait_seconds", "deberta_onnx_model_call_seconds"):
        assert name in after


def test_rerank_load_loses_and_mixes_up_nothing(server: ServerProcess, folders: dict[str, Path]) -> None:
    texts = [*DOCUMENTS, *NER_TEXTS, *HARD_TEXTS][: RERANK_QUERIES + 8]
    expected = rerank_scores(CrossEncoder(folders["rerank"]), texts)
    result = run_load(server.url, texts, expected, requests=300, concurrency=16, rerank=True,
                      model="rerank")
    assert (result.lost, result.mismatched) == (0, 0), result.first_failures


def test_a_token_budget_keeps_every_model_call_within_it(folders: dict[str, Path]) -> None:
    """With --max-batch-tokens 256 (a bucket bound of the histogram) no model call runs more than 256 padded token
    positions, though 16 clients send requests of 1 to 4 texts, short and long, and a batch could hold 64 texts
    in one call. Answers stay exact."""
    budget = 256
    texts = [*DOCUMENTS[:3], *(" ".join([text] * 3) for text in DOCUMENTS[:3]), *NER_TEXTS, *HARD_TEXTS[:4]]
    encoder = Encoder(folders["embed"])
    lengths = encoder.token_count(texts)
    # Every request fits the budget alone (4 of the longest texts), so the budget bounds every call.
    assert padded_tokens([max(lengths)] * 4, encoder.loaded.policy, 64, max_length=encoder.max_length) <= budget
    expected = encoder.encode(texts, normalize=True)
    with ServerProcess(folders["embed"], *_THREADS, "--max-batch-size", "64", "--batch-size", "64",
                       "--max-wait-ms", "20", "--max-batch-tokens", str(budget)) as process:
        result = run_load(process.url, texts, expected, requests=200, concurrency=16)
        assert (result.lost, result.mismatched) == (0, 0), result.first_failures
        family = _families(process)["deberta_onnx_batch_padded_tokens"]
        total = _value(family, "deberta_onnx_batch_padded_tokens_count", model="embed")
        within = _value(family, "deberta_onnx_batch_padded_tokens_bucket", model="embed", le=f"{budget:.1f}")
        assert process.stop(signal.SIGTERM) == 0, process.log
    assert total > 0 and within == total
