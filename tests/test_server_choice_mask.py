"""`deberta-onnx serve` of a multiple-choice and a fill-mask folder: ``POST /v1/multiple-choice`` and
``POST /v1/fill-mask`` over real HTTP (a uvicorn subprocess on loopback, httpx), every answer compared with the library
class run here, concurrent requests merged by the micro-batcher, and the limits and errors of the other routes."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from deberta_onnx.runtime import EncoderConfig, FillMask, MultipleChoice
from deberta_onnx.runtime.server.testing import ServerProcess

from .test_choice_and_mask import MASKED, QUESTIONS

pytestmark = pytest.mark.slow  # a server process, and two exports

_FP32 = EncoderConfig(precision="fp32")


@pytest.fixture(scope="module")
def server(multiple_choice: tuple[Path, Path], fill_mask: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("served")
    folders = [Path(shutil.copytree(multiple_choice[1], root / "choose")),
               Path(shutil.copytree(fill_mask[1], root / "fill"))]
    with ServerProcess(folders, "--threads", "1", "--max-inputs", "12", "--precision", "fp32") as process:
        yield process
        assert process.stop(signal.SIGTERM) == 0, process.log


def _post(server: ServerProcess, route: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def _error(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert code is None or error["code"] == code, error
    return str(error["message"])


def test_models_name_the_tasks_and_routes(server: ServerProcess) -> None:
    data = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert {m["id"]: (m["task"], m["routes"]) for m in data} == {
        "choose": ("multiple-choice", ["/v1/multiple-choice"]), "fill": ("fill-mask", ["/v1/fill-mask"])}
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["models"][1]["mask_token"] == "[MASK]"


def test_multiple_choice_route_answers_as_the_library(server: ServerProcess,
                                                      multiple_choice: tuple[Path, Path]) -> None:
    expected = MultipleChoice(multiple_choice[1], config=_FP32).predict(QUESTIONS[:3])
    body = {"model": "choose", "input": [{"prompt": p, "choices": c} for p, c in QUESTIONS[:3]]}
    response = _post(server, "/v1/multiple-choice", body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    for item, result in zip(data, expected):
        assert item["best"] == result.best and item["answer"] == result.answer
        assert item["scores"] == pytest.approx(result.scores, abs=1e-5)
    assert response.json()["usage"]["prompt_tokens"] > 0
    one = _post(server, "/v1/multiple-choice", {"input": {"prompt": "Q", "choices": ["a", "b"]}}).json()
    assert len(one["data"]) == 1 and len(one["data"][0]["scores"]) == 2


def test_fill_mask_route_answers_as_the_library(server: ServerProcess, fill_mask: tuple[Path, Path]) -> None:
    model = FillMask(fill_mask[1], config=_FP32)
    response = _post(server, "/v1/fill-mask", {"model": "fill", "input": MASKED[:3], "top_k": 2})
    assert response.status_code == 200, response.text
    for item, text in zip(response.json()["data"], MASKED[:3]):
        ours = model(text, top_k=2)
        masks = ours if isinstance(ours[0], list) else [ours]
        assert [[c["token"] for c in mask] for mask in item["masks"]] == [[c["token"] for c in m] for m in masks]
        assert [[c["sequence"] for c in mask] for mask in item["masks"]] == [[c["sequence"] for c in m]
                                                                             for m in masks]
        assert [c["score"] for c in item["masks"][0]] == pytest.approx([c["score"] for c in masks[0]], abs=1e-5)
    targeted = _post(server, "/v1/fill-mask", {"input": MASKED[0], "targets": ["city", "capital"]}).json()
    assert [c["token"] for c in targeted["data"][0]["masks"][0]] == [
        c["token"] for c in model(MASKED[0], targets=["city", "capital"])]


def test_concurrent_requests_are_merged_and_answered_alike(server: ServerProcess) -> None:
    def fill(text: str) -> list[int]:
        reply = _post(server, "/v1/fill-mask", {"input": text, "top_k": 3}).json()
        return [c["token"] for c in reply["data"][0]["masks"][0]]

    alone = [fill(text) for text in (MASKED[0], MASKED[1], MASKED[3])] * 4
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(fill, [MASKED[0], MASKED[1], MASKED[3]] * 4))
    assert together == alone


def test_errors_and_limits(server: ServerProcess) -> None:
    assert "has no mask token [MASK]" in _error(_post(server, "/v1/fill-mask", {"input": ["a [MASK]", "none"]}),
                                                 400)
    assert "top_k" in _error(_post(server, "/v1/fill-mask", {"input": "a [MASK]", "top_k": 0}), 400)
    assert "'targets'" in _error(_post(server, "/v1/fill-mask", {"input": "a [MASK]", "targets": [""]}), 400)
    # A mask past the model's maximum is cut off with the text's end: a 400 before the queue, not a failed call.
    cut = _error(_post(server, "/v1/fill-mask", {"input": ["a [MASK]", "word " * 600 + "[MASK]"]}), 400,
                 "invalid_value")
    assert "input[1] has no mask token [MASK] (it may have been cut off" in cut
    assert "unknown field" in _error(_post(server, "/v1/fill-mask", {"input": "a [MASK]", "k": 1}), 400,
                                     "unknown_field")
    assert "at most 12" in _error(_post(server, "/v1/fill-mask", {"input": ["a [MASK]"] * 13}), 413,
                                  "too_many_inputs")
    too_many = {"input": [{"prompt": "q", "choices": ["a", "b", "c", "d"]}] * 4}
    assert "(prompt, choice) pairs" in _error(_post(server, "/v1/multiple-choice", too_many), 413, "too_many_inputs")
    assert "input[1].choices" in _error(_post(server, "/v1/multiple-choice", {
        "input": [{"prompt": "q", "choices": ["a"]}, {"prompt": "q", "choices": []}]}), 400)
    assert "each question must be" in _error(_post(server, "/v1/multiple-choice", {"input": ["q"]}), 400)
    # A route no served model takes.
    _error(_post(server, "/v1/classify", {"input": "a"}), 400)
