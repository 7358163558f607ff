"""`deberta-onnx serve`: the real server (uvicorn, in a subprocess, on a loopback port) called over real HTTP.

Every vector the server returns is compared with `Encoder.encode` run here. Overload, batching and timeouts are
provoked deterministically by configuration (a long --max-wait-ms holds requests in the queue), never by timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from deberta_onnx.benchmarks.load import run_load
from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.batching import ModelCall
from deberta_onnx.runtime.postprocess import normalize_rows
from deberta_onnx.runtime.server import ServerConfig
from deberta_onnx.runtime.server.errors import ApiError
from deberta_onnx.runtime.server.microbatch import MicroBatcher
from deberta_onnx.runtime.server.openai_api import parse_embedding_request
from deberta_onnx.runtime.server.testing import ServerProcess, decode_embeddings

from .conftest import HARD_TEXTS

# One intra-op thread: the tests' clients share the machine's cores with the server.
_THREADS = ("--threads", "1")
# Long enough that a lone request in a batch that is not full waits for the whole test.
_HOLD = ("--max-wait-ms", "600000")


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> Encoder:
    return Encoder(tiny_model)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    """Default batching and normalisation; small input limits so that 413 is cheap to reach."""
    with ServerProcess(tiny_model, *_THREADS, "--max-inputs", "40", "--max-request-bytes", "65536") as process:
        yield process
        assert process.stop(signal.SIGTERM) == 0, process.log


@pytest.fixture(scope="module")
def tight_server(tiny_model: Path) -> Iterator[ServerProcess]:
    """Batches of 4 texts (run 2 rows at a time), a queue of 4 texts, requests held until a batch is full; raw
    (unnormalised) vectors."""
    flags = ("--max-batch-size", "4", "--batch-size", "2", "--max-queue", "4", "--max-inputs", "4", *_HOLD,
             "--timeout-s", "600", "--no-normalize", "--model-name", "tiny-raw")
    with ServerProcess(tiny_model, *_THREADS, *flags) as process:
        yield process


def _post(server: ServerProcess, body: Any, **kwargs: Any) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, (dict, list)) else body
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/embeddings", content=content, timeout=60, headers=headers, **kwargs)


def _health(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/health", timeout=60)
    assert response.status_code == 200
    return response.json()


def _wait_until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Polls a condition (not a timing assertion: the limit only keeps a broken server from hanging the test)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _in_background(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test, which checks it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


# --- the OpenAI request and response -------------------------------------------------------------------------


def test_embeddings_equal_encode_as_float_and_base64(server: ServerProcess, encoder: Encoder,
                                                     corpus: list[str]) -> None:
    texts = [text for text in HARD_TEXTS if len(text) < 1000] + corpus[:20]  # 512-token texts are slow here
    expected = encoder.encode(texts, normalize=True)
    for encoding_format in ("float", "base64"):
        response = _post(server, {"input": texts, "model": "my-deberta", "encoding_format": encoding_format})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["model"] == "my-deberta"
        assert [item["object"] for item in body["data"]] == ["embedding"] * len(texts)
        kinds = {type(item["embedding"]) for item in body["data"]}
        assert kinds == ({str} if encoding_format == "base64" else {list})
        np.testing.assert_allclose(decode_embeddings(body), expected, atol=1e-6, rtol=0)


def test_a_single_string_gives_one_vector(server: ServerProcess, encoder: Encoder) -> None:
    body = _post(server, {"input": "Just one sentence."}).json()
    assert len(body["data"]) == 1 and body["data"][0]["index"] == 0
    assert body["model"] == _health(server)["model"]  # no `model` in the request: the served name
    np.testing.assert_allclose(decode_embeddings(body)[0], encoder.encode("Just one sentence.", normalize=True),
                               atol=1e-6, rtol=0)


def test_dimensions_truncate_then_renormalise(server: ServerProcess, encoder: Encoder) -> None:
    texts = ["short", "a somewhat longer sentence to embed", ""]
    raw = encoder.encode(texts)
    for dimensions in (1, 8, encoder.hidden_size):
        body = _post(server, {"input": texts, "dimensions": dimensions, "encoding_format": "base64"}).json()
        vectors = decode_embeddings(body)
        assert vectors.shape == (3, dimensions)
        np.testing.assert_allclose(vectors, normalize_rows(raw[:, :dimensions]), atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    _assert_error(_post(server, {"input": texts, "dimensions": encoder.hidden_size + 1}), 400, "dimensions")


def test_usage_counts_the_tokens_the_model_sees(server: ServerProcess, tiny_model: Path, encoder: Encoder) -> None:
    texts = ["", "hello", "x" * 3000, "東京タワー 😀"]
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    tokenizer.enable_truncation(encoder.max_length)
    counts = [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]
    assert counts[2] == encoder.max_length  # the long text counts as truncated, as the model sees it
    usage = _post(server, {"input": texts}).json()["usage"]
    assert usage == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}


def test_health_and_models_describe_the_served_model(server: ServerProcess, tiny_model: Path,
                                                     encoder: Encoder) -> None:
    health = _health(server)
    assert health["status"] == "ok"
    assert health["model"] == tiny_model.name and health["precision"] == encoder.precision
    assert health["provider"] == "CPUExecutionProvider" and health["hidden_size"] == encoder.hidden_size
    assert health["limits"]["max_inputs"] == 40 and health["limits"]["max_request_bytes"] == 65536
    assert health["normalize"] is True and health["limits"]["batch_size"] == ServerConfig().batch_size
    models = httpx.get(f"{server.url}/v1/models", timeout=60).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [tiny_model.name]


# --- bad requests and limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code", "says"),
    [
        (b'{"input": ["a", ', None, "invalid_json", "not valid JSON"),
        (b'\xff\xfe{"input": "a"}', None, "invalid_json", "not UTF-8"),
        (b'["a", "b"]', None, "invalid_json", "must be a JSON object"),
        ({"model": "m"}, "input", "missing_field", "'input' is required"),
        ({"input": 42}, "input", "invalid_value", "string or a list of strings"),
        ({"input": None}, "input", "invalid_value", "got null"),
        ({"input": []}, "input", "invalid_value", "empty list"),
        ({"input": ["a", "b", None, "d"]}, "input[2]", "invalid_value", "input[2] is null"),
        ({"input": ["a", {"text": "b"}]}, "input[1]", "invalid_value", "input[1] is an object"),
        ({"input": [101, 2023, 102]}, "input", "unsupported_value", "token ids"),
        ({"input": ["a", [101, 102]]}, "input[1]", "unsupported_value", "token ids"),
        ({"input": ["ok", "bad \ud800 surrogate"]}, "input[1]", "invalid_value", "unpaired surrogate"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_value", "'float', 'base64'"),
        ({"input": "a", "dimensions": "8"}, "dimensions", "invalid_value", "must be an integer"),
        ({"input": "a", "dimensions": True}, "dimensions", "invalid_value", "must be an integer"),
        ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value", "between 1 and"),
        ({"input": "a", "model": 3}, "model", "invalid_value", "'model' must be a string"),
        ({"input": "a", "dimension": 8}, "dimension", "unknown_field", "unknown field"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server: ServerProcess, body: Any, param: str | None, code: str,
                                               says: str) -> None:
    if isinstance(body, dict):
        body = json.dumps(body)  # ensure_ascii escapes the lone surrogate, as a JSON client would send it
    message = _assert_error(_post(server, body), 400, param, code)
    assert says in message
    assert _post(server, {"input": "still serving"}).status_code == 200


def test_empty_and_odd_strings_are_accepted(server: ServerProcess, encoder: Encoder) -> None:
    texts = ["", "   ", "\t\n", "nul \x00 byte", "é" * 2000]
    vectors = decode_embeddings(_post(server, {"input": texts}).json())
    np.testing.assert_allclose(vectors, encoder.encode(texts, normalize=True), atol=1e-6, rtol=0)


def test_limits_answer_413(server: ServerProcess) -> None:
    message = _assert_error(_post(server, {"input": ["t"] * 41}), 413, "input", "too_many_inputs")
    assert "at most 40" in message
    big = json.dumps({"input": ["x" * 70_000]}).encode()
    _assert_error(_post(server, big), 413, None, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    _assert_error(_post(server, chunks()), 413, None, "request_too_large")
    assert _post(server, {"input": ["t"] * 40}).status_code == 200


def test_unknown_routes_and_methods_answer_in_the_error_shape(server: ServerProcess) -> None:
    _assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=60), 404, code="not_found")
    response = httpx.get(f"{server.url}/v1/embeddings", timeout=60)
    _assert_error(response, 405)
    assert response.headers["allow"] == "POST"


# --- micro-batching, overload, timeouts, faults -------------------------------------------------------------


def test_concurrent_requests_merge_into_one_batch_and_overload_gets_429(tight_server: ServerProcess,
                                                                       encoder: Encoder) -> None:
    """A holds 3 of the 4 queue places and waits for a full batch; B (2 texts) does not fit: 429 at once;
    C (1 text) fills the batch, so A and C run together in one model call, each getting its own rows."""
    before = _health(tight_server)["stats"]
    a_texts, b_texts, c_texts = ["first of A", "second of A", "third of A"], ["B one", "B two"], ["only C"]
    thread, outcome = _in_background(lambda: _post(tight_server, {"input": a_texts, "encoding_format": "base64"}))
    _wait_until(lambda: _health(tight_server)["queue"]["texts"] == 3, "A to be queued")

    overloaded = _post(tight_server, {"input": b_texts})
    assert "overloaded" in _assert_error(overloaded, 429, code="queue_full")
    assert overloaded.headers["retry-after"] == "1"

    c = _post(tight_server, {"input": c_texts})
    thread.join(120)
    a = outcome["value"]
    assert a.status_code == 200 and c.status_code == 200
    assert a.json()["model"] == c.json()["model"] == "tiny-raw"
    np.testing.assert_allclose(decode_embeddings(a.json()), encoder.encode(a_texts), atol=1e-6, rtol=0)
    np.testing.assert_allclose(decode_embeddings(c.json()), encoder.encode(c_texts), atol=1e-6, rtol=0)
    after = _health(tight_server)["stats"]
    assert after["batches_run"] - before["batches_run"] == 1
    assert after["requests_served"] - before["requests_served"] == 2
    assert after["texts_encoded"] - before["texts_encoded"] == 4 and after["largest_batch"] == 4
    assert after["rejected_queue_full"] - before["rejected_queue_full"] == 1
    assert _health(tight_server)["queue"] == {"texts": 0, "requests": 0, "running": 0, "reading": 0}


def test_a_request_past_the_timeout_gets_504_and_leaves_the_queue(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, *_HOLD, "--max-batch-size", "64", "--timeout-s", "0.5") as server:
        message = _assert_error(_post(server, {"input": ["waits for a batch that never fills"]}), 504,
                                code="timeout")
        assert "timeout of 0.5 s" in message
        health = _health(server)
        assert health["queue"] == {"texts": 0, "requests": 0, "running": 0, "reading": 0}
        assert health["stats"]["timed_out"] == 1 and health["stats"]["batches_run"] == 0


def test_a_killed_server_gives_the_client_a_connection_error(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, *_HOLD, "--max-batch-size", "64", "--timeout-s", "600") as server:
        thread, outcome = _in_background(lambda: _post(server, {"input": ["in flight when the server dies"]}))
        _wait_until(lambda: _health(server)["queue"]["requests"] == 1, "the request to be queued")
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        thread.join(60)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), httpx.TransportError), outcome
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=10)


def test_sigterm_answers_the_request_in_flight_then_stops(tiny_model: Path, encoder: Encoder) -> None:
    with ServerProcess(tiny_model, *_THREADS, "--max-wait-ms", "2000", "--max-batch-size", "64") as server:
        thread, outcome = _in_background(lambda: _post(server, {"input": ["answered during shutdown"]}))
        _wait_until(lambda: _health(server)["queue"]["requests"] == 1, "the request to be queued")
        assert server.stop(signal.SIGTERM) == 0  # exits cleanly, after...
        thread.join(60)
        response = outcome["value"]
        assert response.status_code == 200  # ...the queued request was answered
        np.testing.assert_allclose(decode_embeddings(response.json()),
                                   encoder.encode(["answered during shutdown"], normalize=True), atol=1e-6, rtol=0)
        assert "Application shutdown complete" in server.log


def test_a_failing_request_does_not_fail_those_merged_with_it(encoder: Encoder) -> None:
    """The batcher alone, on the real encoder: a model call that fails for one request's text is retried request
    by request, so only that request gets the error."""

    def plan(texts: list[str]) -> Iterator[ModelCall]:
        if "POISON" in texts:
            raise ValueError("this text cannot be encoded")
        return encoder.plan(texts)

    async def scenario() -> list[Any]:
        batcher = MicroBatcher(plan, max_batch_size=5, max_wait_s=600, max_queue=5)
        batcher.start()
        try:
            calls = [batcher.submit(["one", "two"]), batcher.submit(["POISON"]), batcher.submit(["three", "four"])]
            return [*await asyncio.gather(*calls, return_exceptions=True), batcher.stats]
        finally:
            await batcher.close()

    first, poisoned, last, stats = asyncio.run(scenario())
    assert isinstance(poisoned, ValueError)
    np.testing.assert_allclose(first[0], encoder.encode(["one", "two"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(last[0], encoder.encode(["three", "four"]), atol=1e-6, rtol=0)
    assert stats.failed == 1 and stats.requests_served == 2 and stats.batches_run == 2


# --- load ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_2000_requests_from_32_clients_lose_and_mix_up_nothing(server: ServerProcess, encoder: Encoder,
                                                                   corpus: list[str]) -> None:
    expected = encoder.encode(corpus, normalize=True)
    before = _health(server)["stats"]
    result = run_load(server.url, corpus, expected, requests=2000, concurrency=32, atol=1e-5, timeout_s=120)
    print(f"\nload: {result.requests} requests from {result.concurrency} clients in {result.wall_s} s: "
          f"{result.throughput_rps} requests/s, latency {result.latency_ms} ms, server {result.server}")
    assert result.first_failures == []
    assert result.ok == 2000 and result.lost == 0 and result.mismatched == 0
    after = _health(server)["stats"]
    assert after["requests_served"] - before["requests_served"] == 2000  # each request answered exactly once
    assert after["failed"] == before["failed"] and after["timed_out"] == before["timed_out"]


# --- no server needed ---------------------------------------------------------------------------------------


def test_parse_request_accepts_the_openai_shape() -> None:
    body = json.dumps({"input": ["a", ""], "model": "m", "encoding_format": "base64", "dimensions": 4,
                       "user": "someone"}).encode()
    request = parse_embedding_request(body, max_inputs=10, hidden_size=32)
    assert request.texts == ["a", ""] and request.model == "m"
    assert request.encoding_format == "base64" and request.dimensions == 4
    defaults = parse_embedding_request(b'{"input": "a"}', max_inputs=1, hidden_size=32)
    assert defaults.texts == ["a"] and defaults.encoding_format == "float" and defaults.dimensions is None
    with pytest.raises(ApiError) as caught:
        parse_embedding_request(b'{"input": ["a", "b"]}', max_inputs=1, hidden_size=32)
    assert caught.value.status == 413 and caught.value.param == "input"


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("port", 70000, "between 0 and 65535"),
        ("port", -1, "port must be an int >= 0"),
        ("max_batch_size", 0, "max_batch_size must be an int >= 1"),
        ("max_queue", True, "max_queue must be an int"),
        ("max_wait_ms", -1.0, "max_wait_ms must be a finite number >= 0"),
        ("timeout_s", 0, "timeout_s must be a finite number > 0"),
        ("timeout_s", float("inf"), "timeout_s must be a finite number"),
        ("max_inputs", 5000, "max_inputs (5000) must not exceed max_queue (4096)"),
        ("host", "", "host must be a non-empty address"),
        ("model_name", "", "model_name must be a non-empty string"),
    ],
)
def test_server_config_rejects_bad_values(field: str, value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig(**{field: value})  # type: ignore[arg-type]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_runtime_and_cli_import_no_server_packages() -> None:
    result = _python("import sys, deberta_onnx.runtime, deberta_onnx.runtime.cli\n"
                     "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'httpx')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_without_the_extra_names_it(tiny_model: Path) -> None:
    # A None entry in sys.modules makes the import fail, as when the package is not installed.
    code = ("import sys\nsys.modules['starlette'] = sys.modules['uvicorn'] = None\n"
            "from deberta_onnx.runtime.cli import main\nsys.exit(main(['serve', sys.argv[1]]))")
    result = _python(code, str(tiny_model))
    assert result.returncode == 3
    assert "pip install 'deberta-onnx[server]'" in result.stderr


def test_help_lists_serve_with_its_limits() -> None:
    from deberta_onnx.runtime.cli import build_parser

    assert "serve" in build_parser().format_help()
    result = _python("from deberta_onnx.runtime.cli import main\nmain(['serve', '--help'])")
    for flag in ("--max-batch-size", "--batch-size", "--max-wait-ms", "--max-queue", "--max-request-bytes",
                 "--max-inputs", "--timeout-s", "--no-normalize", "--precision", "--threads", "--read-timeout-s",
                 "--keep-alive-s", "--max-connections", "--shutdown-timeout-s", "--allowed-host"):
        assert flag in result.stdout
