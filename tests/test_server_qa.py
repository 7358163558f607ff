"""`POST /v1/question-answering` over real HTTP (a uvicorn subprocess on loopback, httpx): answers equal
``QuestionAnswerer``'s run here, several requests' windows micro-batched together, and the route's limits and
errors."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from deberta_onnx.runtime import QuestionAnswerer
from deberta_onnx.runtime.server.testing import ServerProcess

ROUTE = "/v1/question-answering"


@pytest.fixture(scope="module")
def server(qa: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = Path(shutil.copytree(qa[1], tmp_path_factory.mktemp("served") / "qa"))
    with ServerProcess([folder], "--threads", "1", "--max-inputs", "8", "--max-wait-ms", "20") as process:
        yield process
        assert process.stop(signal.SIGTERM) == 0, process.log


def _post(server: ServerProcess, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{ROUTE}", json=body, timeout=60)


@pytest.mark.slow
def test_answers_over_http_equal_the_library(server: ServerProcess, qa: tuple[Path, Path], corpus: list[str]) -> None:
    answerer = QuestionAnswerer(qa[1])
    long_context = " ".join(corpus[40:80])
    bodies = [{"question": "What is it?", "context": corpus[3]},
              {"question": ["Where?", "Who?"], "context": [long_context, corpus[5]], "top_k": 2},
              {"question": "Anything?", "context": corpus[7], "handle_impossible_answer": True}]
    with ThreadPoolExecutor(len(bodies)) as pool:  # at once: their windows are merged into shared model calls
        responses = list(pool.map(lambda body: _post(server, body), bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        data = response.json()
        questions = body["question"] if isinstance(body["question"], list) else [body["question"]]
        contexts = body["context"] if isinstance(body["context"], list) else [body["context"]] * len(questions)
        options = {k: v for k, v in body.items() if k not in ("question", "context")}
        expected = answerer.answer(questions, contexts, top_k=10, **{k: v for k, v in options.items()
                                                                     if k != "top_k"})
        for item, every in zip(data["data"], expected):
            want = every[: options.get("top_k", 1)]  # type: ignore[index]
            assert [(a["start"], a["end"], a["answer"]) for a in item["answers"]] == [
                (a["start"], a["end"], a["answer"]) for a in want]  # type: ignore[index]
            scores = [a["score"] for a in want]  # type: ignore[index]
            assert [a["score"] for a in item["answers"]] == pytest.approx(scores, abs=1e-5)
        windows = sum(len(answerer.windows(q, c)) for q, c in zip(questions, contexts))
        assert data["usage"]["prompt_tokens"] == sum(
            len(w.ids) for q, c in zip(questions, contexts) for w in answerer.windows(q, c)) and windows >= 1
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["data"][0]["task"] == "question-answering" and ROUTE in models["data"][0]["routes"]


@pytest.mark.slow
def test_limits_and_errors(server: ServerProcess, corpus: list[str]) -> None:
    cases = [({"question": "Where?"}, 400, "'context' is required"),
             ({"question": "Where?", "context": ""}, 400, "context 0 is empty"),
             ({"question": ["a?", "b?"], "context": ["one"]}, 400, "1 contexts for 2 questions"),
             ({"question": ["q?"] * 9, "context": "c"}, 413, "at most 8"),
             ({"question": "Where?", "context": " ".join(corpus * 3)}, 413, "windows of"),
             ({"question": " ".join(corpus[:30]), "context": "c"}, 400, "Shorten the question"),
             ({"question": "Where?", "context": "c", "top_k": 0}, 400, "'top_k' must be at least 1"),
             ({"question": "Where?", "context": "c", "answer_len": 3}, 400, "unknown field")]
    for body, status, message in cases:
        response = _post(server, body)
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["error"]["message"], response.text
