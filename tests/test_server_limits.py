"""`deberta-onnx serve` against hostile or careless clients: the real server (a subprocess on a loopback port),
real HTTP and raw sockets. Timeouts, disconnects, slow or stuck clients, SIGTERM while busy, hostile JSON, foreign
Host headers and content types.

What is asserted are counts, statuses and log lines, never durations: a limit passed to `_wait_until` only keeps a
broken server from hanging the test.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.server.testing import ServerProcess, decode_embeddings

_THREADS = ("--threads", "1")
_HOLD = ("--max-wait-ms", "600000")  # a batch that is not full waits for the whole test
# ~512 tokens each: one model call of one of them is slow next to the 1 s timeout below on any machine.
_LONG = "lorem ipsum dolor sit amet " * 120


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> Encoder:
    return Encoder(tiny_model)


def _health(server: ServerProcess, **headers: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/health", timeout=60, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _post(server: ServerProcess, body: Any, content_type: str | None = "application/json",
          **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(f"{server.url}/v1/embeddings", content=content, timeout=120, headers=headers)


def _wait_until(condition: Callable[[], bool], what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _raw(server: ServerProcess, data: bytes) -> socket.socket:
    """A raw connection that sent ``data`` (maybe a part of a request) and keeps the rest to itself."""
    connection = socket.create_connection(("127.0.0.1", _port(server)), timeout=120)
    connection.sendall(data)
    return connection


def _request(body: bytes, *, declared: int | None = None, close: bool = False) -> bytes:
    length = len(body) if declared is None else declared
    return (b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + (b"Connection: close\r\n" if close else b"")
            + b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body)


def _reading(server: ServerProcess, count: int) -> None:
    _wait_until(lambda: _health(server)["queue"]["reading"] == count, f"{count} request bodies to be read")


def _read_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


# --- 1. a 504 stops the work -------------------------------------------------------------------------------


def test_a_timed_out_request_frees_the_worker(tiny_model: Path, encoder: Encoder) -> None:
    flags = ("--timeout-s", "1", "--batch-size", "1", "--max-batch-size", "4", "--max-inputs", "1024",
             "--max-request-bytes", str(8 << 20))
    with ServerProcess(tiny_model, *_THREADS, *flags) as server:
        before = _health(server)["stats"]
        response = _post(server, {"input": [_LONG] * 1024, "encoding_format": "base64"})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        # The worker stops after the call it is in: nothing runs for the request any more...
        _wait_until(lambda: _health(server)["queue"]["running"] == 0, "the worker to leave the timed-out request")
        delta = _stats_delta(before, _health(server)["stats"])
        assert delta["timed_out"] == 1 and "requests_served" not in delta
        assert delta["model_calls"] < 1024 and delta["texts_dropped"] == 1024 - delta["model_calls"]
        # ...so the next client is served, within the same timeout.
        answer = _post(server, {"input": ["served next"]})
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(decode_embeddings(answer.json()), encoder.encode(["served next"], normalize=True),
                                   atol=1e-6, rtol=0)


# --- 2. requests of clients that left are not computed -----------------------------------------------------


def test_queued_requests_of_clients_that_left_are_dropped(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, *_HOLD, "--max-batch-size", "64", "--timeout-s", "600") as server:
        before = _health(server)["stats"]
        body = json.dumps({"input": ["abandoned one", "abandoned two"]}).encode()
        clients = [_raw(server, _request(body)) for _ in range(10)]
        _wait_until(lambda: _health(server)["queue"]["requests"] == 10, "10 requests to be queued")
        for client in clients:
            client.close()
        _wait_until(lambda: _health(server)["queue"] == {"texts": 0, "requests": 0, "running": 0, "reading": 0},
                    "the abandoned requests to leave the queue")
        delta = _stats_delta(before, _health(server)["stats"])
        assert delta == {"disconnected": 10, "texts_dropped": 20}  # nothing computed, nothing counted as served
        assert "Traceback" not in server.log


def test_a_running_request_whose_client_left_stops(tiny_model: Path) -> None:
    flags = ("--batch-size", "1", "--max-inputs", "256", "--max-request-bytes", str(4 << 20), "--timeout-s", "600")
    with ServerProcess(tiny_model, *_THREADS, *flags) as server:
        before = _health(server)["stats"]
        client = _raw(server, _request(json.dumps({"input": [_LONG] * 256}).encode()))
        _wait_until(lambda: _health(server)["stats"]["model_calls"] > before["model_calls"], "the first model call")
        client.close()
        _wait_until(lambda: _health(server)["queue"]["running"] == 0, "the worker to drop the request")
        delta = _stats_delta(before, _health(server)["stats"])
        assert delta["disconnected"] == 1 and "requests_served" not in delta
        assert 1 <= delta["model_calls"] < 256 and delta["texts_dropped"] == 256 - delta["model_calls"]


# --- 3. slow and stuck clients, connection cap, SIGTERM ----------------------------------------------------


def test_slow_headers_and_bodies_are_cut_off(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, "--read-timeout-s", "1") as server:
        head = _raw(server, b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        body = _raw(server, _request(b'{"input": ["never fin', declared=100))
        assert _read_all(head) == b""  # closed without an answer: there was no request to answer
        answer = _read_all(body).decode()
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer
        assert "connection: close" in answer.lower()
        assert "no request head within 1 s" in server.log
        assert _post(server, {"input": ["still serving"]}).status_code == 200


def test_connections_are_capped(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, "--max-connections", "4", "--read-timeout-s", "600") as server:
        stuck = [_raw(server, b"GET /health HTTP/1.1\r\n") for _ in range(3)]
        _wait_until(lambda: httpx.get(f"{server.url}/health", timeout=60).status_code == 503, "the cap")
        for connection in stuck:
            connection.close()
        _wait_until(lambda: httpx.get(f"{server.url}/health", timeout=60).status_code == 200, "the cap to lift")


def test_sigterm_drains_with_health_503_then_exits_0(tiny_model: Path, encoder: Encoder) -> None:
    flags = (*_HOLD, "--max-batch-size", "64", "--read-timeout-s", "600", "--shutdown-timeout-s", "600")
    with ServerProcess(tiny_model, *_THREADS, *flags) as server:
        queued = _raw(server, _request(json.dumps({"input": ["in flight at SIGTERM"]}).encode(), close=True))
        stuck = _raw(server, _request(b'{"input": ["never fin', declared=100))
        _wait_until(lambda: _health(server)["queue"]["requests"] == 1, "the request to be queued")
        _reading(server, 1)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        # Draining: the listener stays open, /health says 503, new work is refused, work in flight is answered.
        _wait_until(lambda: httpx.get(f"{server.url}/health", timeout=60).status_code == 503, "/health to say 503")
        assert httpx.get(f"{server.url}/health", timeout=60).json()["status"] == "draining"
        refused = _post(server, {"input": ["too late"]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        answer = _read_all(queued).decode()
        assert answer.startswith("HTTP/1.1 200")
        vector = decode_embeddings(json.loads(answer.split("\r\n\r\n", 1)[1]))
        np.testing.assert_allclose(vector, encoder.encode(["in flight at SIGTERM"], normalize=True), atol=1e-6, rtol=0)
        assert server.process.poll() is None  # the stuck client still holds the drain open...
        stuck.close()  # ...until it leaves
        assert server.process.wait(120) == 0
        assert "Exception in ASGI application" not in server.log


def test_sigterm_exits_0_within_the_shutdown_timeout_despite_a_stuck_client(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, "--read-timeout-s", "600", "--shutdown-timeout-s", "1") as server:
        stuck = _raw(server, _request(b'{"input": ["never fin', declared=100))
        _reading(server, 1)
        assert server.stop(signal.SIGTERM, timeout_s=120) == 0, server.log
        answer = _read_all(stuck).decode()  # told why, rather than cut off
        assert answer.startswith("HTTP/1.1 503") and "shutting_down" in answer
        stuck.close()
        assert "cancelled at the shutdown deadline" in server.log and "Traceback" not in server.log


# --- 7. hostile JSON, 500s -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "says"), [
    (b"[" * 100_000 + b"]" * 100_000, "nests arrays or objects too deeply"),
    (b'{"input": ' + b"[" * 100_000, "nests arrays or objects too deeply"),
    (b'{"input": "a", "dimensions": ' + b"7" * 5000 + b"}", "holds a number that cannot be read"),
    (b'{"input": ["a", ' + b"9" * 5000 + b"]}", "holds a number that cannot be read"),
])
def test_hostile_json_is_a_400_logged_in_one_line(tiny_model: Path, body: bytes, says: str,
                                                  hostile_server: ServerProcess) -> None:
    response = _post(hostile_server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and says in error["message"]
    assert _post(hostile_server, {"input": "still serving"}).status_code == 200
    assert "Traceback" not in hostile_server.log and "ERROR" not in hostile_server.log
    assert f"400 invalid_json: request body {says}" in hostile_server.log


@pytest.fixture(scope="module")
def hostile_server(tiny_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_model, *_THREADS) as server:
        yield server


# A real server whose model fails for one text, to see what a 500 shows.
_FAILING = textwrap.dedent(
    """
    import sys
    from deberta_onnx.runtime import Encoder
    from deberta_onnx.runtime.cli import main
    plan = Encoder.plan
    def failing_plan(self, texts, *args, **kwargs):
        if "POISON" in texts:
            raise RuntimeError("secret internal state at 0xdeadbeef")
        return plan(self, texts, *args, **kwargs)
    Encoder.plan = failing_plan
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_500_reveals_nothing_and_is_logged_once(tiny_model: Path) -> None:
    launcher = (sys.executable, "-c", _FAILING)
    with ServerProcess(tiny_model, *_THREADS, launcher=launcher) as server:
        response = _post(server, {"input": ["fine", "POISON"]})
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "internal error; the server's log says more",
                                            "type": "server_error", "param": None, "code": "internal_error"}
        assert _post(server, {"input": ["fine"]}).status_code == 200
        assert server.log.count("secret internal state") == 1  # the operator sees the cause, once
        assert "Exception in ASGI application" not in server.log


# --- 8. Host and Content-Type ------------------------------------------------------------------------------


def test_foreign_hosts_and_content_types_are_refused(hostile_server: ServerProcess) -> None:
    server = hostile_server
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io"):
        response = httpx.get(f"{server.url}/health", headers={"Host": host}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host", host
        assert "model_dir" not in response.text  # nothing about the server leaks to a rebinding page
        assert _post(server, {"input": "x"}, Host=host).status_code == 400
    for host in ("127.0.0.1", f"127.0.0.1:{_port(server)}", "localhost", f"LOCALHOST:{_port(server)}"):
        assert _health(server, Host=host)["status"] == "ok"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None, "application/jsonx"):
        response = _post(server, {"input": "x"}, content_type=content_type)
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    assert _post(server, {"input": "x"}, content_type="application/json; charset=utf-8").status_code == 200


def test_allowed_hosts_widen_the_check(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS, "--allowed-host", "api.example", "--allowed-host", "Other.Example.") \
            as server:
        for host in ("api.example", "api.example:443", "other.example"):
            assert _health(server, Host=host)["status"] == "ok"
        assert httpx.get(f"{server.url}/health", headers={"Host": "evil.example"}, timeout=60).status_code == 400
    with ServerProcess(tiny_model, *_THREADS, "--allowed-host", "*") as server:
        assert _health(server, Host="anything.example")["status"] == "ok"


# --- 9. a client leaving mid-body ----------------------------------------------------------------------------


def test_a_client_leaving_mid_body_is_not_an_error(hostile_server: ServerProcess) -> None:
    server = hostile_server
    before = _health(server)["stats"]
    connection = _raw(server, _request(b'{"input": ["half of a bo', declared=1000))
    _reading(server, 1)
    connection.close()
    _wait_until(lambda: _health(server)["stats"]["disconnected"] > before["disconnected"], "the disconnect")
    assert "Exception in ASGI application" not in server.log and "Traceback" not in server.log
    assert _post(server, {"input": "still serving"}).status_code == 200
