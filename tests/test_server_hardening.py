"""`deberta-onnx serve` against a hostile but fair client, second round (issue 29): memory bounded by the model's
length whatever the body, connections closed after a body nobody read, a lone surrogate in `model`, answers built
off the event loop, malformed bodies on a server of several models, model calls sized under a deadline.

Real server processes on loopback ports, real HTTP and raw sockets; memory is the process's peak RSS as the kernel
counts it (VmHWM), never a duration.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from deberta_onnx.runtime import CrossEncoder, Encoder, TokenClassifier
from deberta_onnx.runtime.server.models import load_folder
from deberta_onnx.runtime.server.testing import ServerProcess

_THREADS = ("--threads", "1")
# ~512 tokens (the tiny models' maximum) each.
_LONG = "lorem ipsum dolor sit amet " * 120


def _post(server: ServerProcess, route: str, body: Any, *, timeout: float = 300, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{route}", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **headers})


def _error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def _peak_mb(server: ServerProcess) -> float:
    """The server process's highest RSS so far (the kernel's VmHWM), in MB."""
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# --- 1. memory bounded by max_length, not by the body -----------------------------------------------------------


def _tokenize_bound_mb(model_dir: Path) -> float:
    """What tokenizing at once may cost past a server's legitimate peak: the most characters tokenized together
    (``char_limit``, from ``max_length`` and the vocabulary) at 256 bytes each (the tokenizer's own cost per
    character is about 190 bytes on a text of one repeated letter, its worst case here), plus a request's
    ``max_inputs`` (2,048) encodings of ``max_length`` tokens at 192 bytes each (a tokenizers
    ``Encoding`` holds about 155 bytes per token: ids, type ids, token strings, offsets, word ids, masks)."""
    model = load_folder(model_dir)
    max_length, tokenizer = model.max_length, model.loaded.tokenizer
    assert tokenizer.char_limit is not None
    return (tokenizer.char_limit * 256 + 2048 * max_length * 192) / 2**20


@pytest.mark.slow
def test_a_huge_text_costs_memory_by_max_length_not_by_its_size(tiny_model: Path) -> None:
    bound = _tokenize_bound_mb(tiny_model)
    with ServerProcess(tiny_model, *_THREADS, "--max-request-bytes", str(16 << 20)) as server:
        # What the model's length legitimately costs: requests of texts at the maximum length.
        for _ in range(2):
            assert _post(server, "/v1/embeddings", {"input": [_LONG] * 64}).status_code == 200
        legit = _peak_mb(server)
        hostile = [{"input": "a" * 4_000_000}, {"input": "a " * 2_000_000}, {"input": ["ab " * 100_000] * 40},
                   {"input": "\u6f22" * 2_000_000}, {"input": "word " + " " * 4_000_000 + "end"}]
        for body in hostile:
            response = _post(server, "/v1/embeddings", body)
            assert response.status_code == 200, response.text
        peak = _peak_mb(server)
    print(f"embeddings: legitimate peak {legit:.0f} MB, after hostile bodies {peak:.0f} MB, bound +{bound:.0f} MB")
    assert peak - legit < bound, (legit, peak, bound)


@pytest.mark.slow
def test_a_rerank_query_is_tokenized_once_not_per_document(reranker: tuple[Path, Path]) -> None:
    model = reranker[1]
    bound = _tokenize_bound_mb(model)
    with ServerProcess(model, *_THREADS, "--max-request-bytes", str(16 << 20), "--timeout-s", "1800") as server:
        for _ in range(2):
            body = {"query": _LONG, "documents": [_LONG] * 8}
            assert _post(server, "/v1/rerank", body).status_code == 200
        legit = _peak_mb(server)
        query = "lorem ipsum " * 1700  # 20 KB
        # The body that once cost 2.6 GB: 2,048 one-letter documents whose pairs were 2,048 copies of the query.
        # 512 are enough to show it (a copy of the query per pair cost 1.3 MB to tokenize: 650 MB here, over three
        # times the bound) at a quarter of the model time: 512 pairs of 512 tokens, then 64 long documents.
        for documents in (["x"] * 512, ["y " * 1000] * 64):
            response = _post(server, "/v1/rerank", {"query": query, "documents": documents}, timeout=1800)
            assert response.status_code == 200, response.text
            assert len(response.json()["results"]) == len(documents)
        peak = _peak_mb(server)
    print(f"rerank: legitimate peak {legit:.0f} MB, after hostile bodies {peak:.0f} MB, bound +{bound:.0f} MB")
    assert peak - legit < bound, (legit, peak, bound)


def _hard_texts(cut: int) -> list[str]:
    """Texts longer than the character cut whose truncation a naive cut would get wrong: whitespace runs, characters
    the normaliser drops, multi-byte and unknown characters, a word longer than the cut."""
    words = ["lorem", "ipsum", "dolor", "Ünïcödé", "漢字テキスト", "naïve", "café", "e\u0301", "😀"]
    rng = np.random.default_rng(29)
    pieces = [" ".join(rng.choice(words, 40)) for _ in range(4)]
    return [
        pieces[0] + " " * (2 * cut) + pieces[1] * 40,
        "\n\t " * cut + pieces[2] * 40,
        "\x01" * (cut + 7) + " " + pieces[3] * 40,
        "😀" * (cut // 2) + " " + pieces[0] * 40,
        "漢字" * cut,
        pieces[1] + " " + "a" * (3 * cut) + " " + pieces[2] * 40,
        (pieces[3] + "   ") * 40,
        " " + pieces[0] * 2 + " " * (cut - 5) + pieces[1] * 40,
    ]


@pytest.mark.slow
def test_cut_texts_tokenize_as_the_whole_texts(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    tokenizer = encoder.loaded.tokenizer
    assert tokenizer.char_cut is not None and tokenizer.char_limit is not None
    whole = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    whole.no_padding()
    whole.enable_truncation(encoder.max_length)
    texts = _hard_texts(tokenizer.char_cut)
    assert all(len(text) > tokenizer.char_cut for text in texts)
    pairs = [(texts[i], texts[(i + 3) % len(texts)]) for i in range(len(texts))] + [(texts[0], "short")]
    for items in (texts, pairs):
        for details in (False, True):
            got = tokenizer.encodings(items, details=details)
            for item, mine in zip(items, got):
                want = whole.encode(item) if isinstance(item, str) else whole.encode(*item)
                assert mine.ids == want.ids and mine.type_ids == want.type_ids
                assert bool(mine.overflowing) == bool(want.overflowing)
                if details:
                    assert mine.offsets == want.offsets and mine.word_ids == want.word_ids
                    assert mine.tokens == want.tokens


def test_the_library_and_the_cross_encoder_take_huge_inputs(tiny_model: Path, reranker: tuple[Path, Path],
                                                           ner: tuple[Path, Path]) -> None:
    long_text = "lorem ipsum dolor " * 200_000  # 3.6 MB
    encoder = Encoder(tiny_model)
    assert encoder.token_count([long_text]) == [encoder.max_length]
    np.testing.assert_allclose(encoder.encode([long_text]), encoder.encode([long_text[:5000]]), atol=1e-6)
    with pytest.raises(ValueError, match="longer than the model's maximum"):
        encoder.encode([long_text], truncate=False)
    scores = CrossEncoder(reranker[1]).predict([(long_text, "x"), (long_text[:5000], "x")])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    spans = TokenClassifier(ner[1]).predict([long_text, long_text[:5000]])
    assert spans[0] == spans[1]


# --- 3. responses to unread bodies close the connection -----------------------------------------------------


def _head_and_close(port: int, request: bytes) -> bytes:
    """Sends ``request`` (headers and the first byte of a longer body) on a raw connection; returns what the server
    sent until it closed the connection (a socket timeout, the test's guard against a server that keeps it open,
    fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_responses_to_unread_bodies_close_the_connection(tiny_model: Path) -> None:
    with ServerProcess(tiny_model, *_THREADS) as server:
        port = int(server.url.rsplit(":", 1)[1])
        cases = {
            b"415": b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n",
            b"400": b"POST /v1/embeddings HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n",
            b"404": b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n",
            b"200": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        }
        for status, head in cases.items():
            answer = _head_and_close(port, head + b"Content-Length: 1000\r\n\r\n{")
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
            assert b"connection: close" in answer.lower(), answer[:400]
        # A body read to its end keeps the connection for the next request.
        with httpx.Client(timeout=60) as client:
            for _ in range(2):
                response = client.get(f"{server.url}/health")
                assert response.status_code == 200 and "close" not in response.headers.get("connection", "")
        assert "Traceback" not in server.log


# --- 4 and 10. a lone surrogate in `model`; malformed bodies on a server of several models -----------------------


_SURROGATE = b'{"input": "a", "model": "\\ud800"}'


@pytest.fixture(scope="module")
def two_models(tiny_model: Path, nli: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """An embedding model and an NLI classifier, in folders of their own names (the server routes by them)."""
    root = tmp_path_factory.mktemp("two-models")
    for name, folder in (("embed", tiny_model), ("nli", nli[1])):
        (root / name).symlink_to(folder, target_is_directory=True)
    return [root / "embed", root / "nli"]


def test_a_lone_surrogate_in_model_is_a_400_on_every_route(tiny_model: Path, reranker: tuple[Path, Path],
                                                          two_models: list[Path]) -> None:
    with ServerProcess(tiny_model, *_THREADS) as server:
        _error(_post(server, "/v1/embeddings", _SURROGATE), 400, "invalid_value", "model")
        assert _post(server, "/v1/embeddings", {"input": "a", "model": "x"}).status_code == 200
    with ServerProcess(reranker[1], *_THREADS) as server:
        _error(_post(server, "/v1/rerank", b'{"query": "q", "documents": ["d"], "model": "\\udfff"}'), 400,
               "invalid_value", "model")
        _error(_post(server, "/v1/classify", _SURROGATE), 400, "invalid_value", "model")
    with ServerProcess(two_models, *_THREADS) as server:
        for route in ("/v1/embeddings", "/v1/classify", "/v1/rerank"):
            _error(_post(server, route, _SURROGATE), 400, "invalid_value", "model")
        assert "Traceback" not in server.log and "ERROR" not in server.log


@pytest.mark.parametrize("body", [
    b'{"model": "MODEL", "input": "\xff\xfe"}',
    b'{"model": "MODEL", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'[{"model": "MODEL", "input": "a"}]',
    b'{"model": "MODEL", "input": "a", "dimensions": ' + b"7" * 5000 + b"}",
    b'{"model": "MODEL", "input": "a"',
])
def test_a_server_of_several_models_answers_malformed_bodies_as_one_does(two_models: list[Path],
                                                                        body: bytes) -> None:
    name = b"embed"
    with ServerProcess(two_models[0], *_THREADS) as single:
        one = _error(_post(single, "/v1/embeddings", body.replace(b"MODEL", name)), 400, "invalid_json")
    with ServerProcess(two_models, *_THREADS) as several:
        many = _error(_post(several, "/v1/embeddings", body.replace(b"MODEL", name)), 400, "invalid_json")
    assert many["message"].split("; send")[0] == one["message"].split("; send")[0]


# --- 6. answers are built off the event loop -----------------------------------------------------------------


# A real server whose span building fails if it runs on the event loop's thread.
_SPANS_OFF_THE_LOOP = textwrap.dedent(
    """
    import asyncio, sys
    from deberta_onnx.runtime import TokenClassifier
    from deberta_onnx.runtime.cli import main
    spans = TokenClassifier.spans
    def checked_spans(self, *args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return spans(self, *args, **kwargs)
        raise RuntimeError("spans built on the event loop")
    TokenClassifier.spans = checked_spans
    sys.exit(main(sys.argv[1:]))
    """
)


def test_token_classification_answers_are_built_off_the_event_loop(ner: tuple[Path, Path]) -> None:
    classifier = TokenClassifier(ner[1])
    texts = ["Ada Lovelace lived in London.", _LONG[:400]] * 20
    with ServerProcess(ner[1], *_THREADS, launcher=(sys.executable, "-c", _SPANS_OFF_THE_LOOP)) as server:
        response = _post(server, "/v1/classify", {"input": texts})
        assert response.status_code == 200, server.log[-2000:]
        got = [[(s["label"], s["start"], s["end"]) for s in item["spans"]] for item in response.json()["data"]]
        assert got == [[(s.label, s.start, s.end) for s in item] for item in classifier.predict(texts)]
        assert "spans built on the event loop" not in server.log


# --- 12. model calls sized under a deadline --------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def test_model_calls_are_sized_so_a_deadline_frees_the_worker_soon(tiny_model: Path) -> None:
    flags = ("--timeout-s", "1", "--max-call-tokens", "512", "--batch-size", "8", "--max-inputs", "1024",
             "--max-request-bytes", str(8 << 20))
    with ServerProcess(tiny_model, *_THREADS, *flags) as server:
        assert httpx.get(f"{server.url}/health", timeout=60).json()["limits"]["max_call_tokens"] == 512
        response = _post(server, "/v1/embeddings", {"input": [_LONG] * 1024, "encoding_format": "base64"})
        _error(response, 504, "timeout")
        health = httpx.get(f"{server.url}/health", timeout=60).json()
        while health["queue"]["running"]:
            time.sleep(0.05)
            health = httpx.get(f"{server.url}/health", timeout=60).json()
        metrics = httpx.get(f"{server.url}/metrics", timeout=60).text
    name = tiny_model.name
    calls = _metric(metrics, "deberta_onnx_batch_padded_tokens_count", model=name)
    small = _metric(metrics, "deberta_onnx_batch_padded_tokens_bucket", model=name, le="512.0")
    # Every call ran at most 512 padded tokens (one text of the model's 512): what the worker finished after the
    # deadline is one such call, and nothing more ran for the request.
    assert calls == small and 0 < calls < 1024, (calls, small)
    assert health["stats"]["texts_dropped"] == 1024 - calls
