"""Load test of `deberta-onnx serve` on loopback: many concurrent clients, every response checked.

    python benchmarks/load.py MODEL_DIR --requests 2000 --concurrency 32 --output load.json
    python benchmarks/load.py RERANKER_DIR --rerank --output load-rerank.json

Starts the real server (a `deberta-onnx serve` subprocess on 127.0.0.1, a free port), computes the expected
vector of every text locally with `Encoder.encode`, then sends the requests from `--concurrency` clients at
once (1 to 4 texts each, float and base64 in turn) and compares each returned vector with its expected one.
With ``--rerank`` (a cross-encoder folder) each request is ``POST /v1/rerank`` of one of 8 queries against 1 to 4
texts, and every returned score is compared with ``CrossEncoder.predict`` of its pair, the order with the scores'.
Reports lost responses (no answer or an error status), mismatched ones (a vector that is not its text's),
throughput and latency percentiles, and the server's batching counters. Needs the server and dev extras.
Absolute figures depend on the machine and on what else runs on it; compare runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from deberta_onnx.runtime.server.testing import ServerProcess, decode_embeddings

__all__ = ["RERANK_QUERIES", "LoadResult", "build_requests", "rerank_scores", "run_load"]

def build_requests(count: int, pool_size: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """``count`` requests as (indices into a pool of texts, encoding_format): 1 to 4 texts, formats in turn."""
    rng = np.random.default_rng(seed)
    return [
        ([int(i) for i in rng.integers(0, pool_size, size=1 + n % 4)], "base64" if n % 2 else "float")
        for n in range(count)
    ]


@dataclass(frozen=True)
class LoadResult:
    """What one load run saw. ``lost``: no answer or an error status; ``mismatched``: a wrong vector."""

    requests: int
    concurrency: int
    ok: int
    lost: int
    mismatched: int
    wall_s: float
    throughput_rps: float
    latency_ms: dict[str, float]
    server: dict[str, Any]
    first_failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RERANK_QUERIES = 8  # queries of a rerank load test: the pool's first texts, request n asks query n % 8


def _check_embeddings(body: dict[str, Any], indices: list[int], expected: np.ndarray, atol: float) -> bool:
    vectors = decode_embeddings(body)
    return vectors.shape == (len(indices), expected.shape[1]) and bool(
        np.allclose(vectors, expected[indices], atol=atol, rtol=0))


def _check_rerank(body: dict[str, Any], indices: list[int], expected: np.ndarray, atol: float) -> bool:
    """Every document scored as its pair's expected score, each once, best first."""
    results = body.get("results", [])
    seen = [r["index"] for r in results]
    if sorted(seen) != list(range(len(indices))):
        return False
    scores = np.asarray([r["relevance_score"] for r in results], dtype=np.float32)
    wanted = expected[[indices[i] for i in seen]]
    return bool(np.allclose(scores, wanted, atol=atol, rtol=0) and (np.diff(scores) <= 0).all())


def _load(
    url: str, texts: Sequence[str], expected: np.ndarray, requests: list[tuple[list[int], str]], concurrency: int,
    atol: float, timeout_s: float, rerank: bool = False, model: str | None = None,
) -> tuple[list[float], list[str], int]:
    # Threads with httpx's sync client: on a busy machine its AsyncClient spent several times more CPU per
    # request than the server did, and the test measured the client.
    latencies: list[float] = []
    failures: list[str] = []
    mismatches = [0]
    lock = threading.Lock()
    next_request = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def take() -> int | None:
        with lock:
            return next(next_request, None)

    def worker(client: httpx.Client) -> None:
        while (n := take()) is not None:  # each request is sent exactly once
            indices, encoding_format = requests[n]
            query = n % RERANK_QUERIES
            documents = [texts[i] for i in indices]
            route, body = (("/v1/rerank", {"query": texts[query], "documents": documents}) if rerank else
                           ("/v1/embeddings", {"input": documents, "encoding_format": encoding_format}))
            if model is not None:
                body["model"] = model
            start = time.perf_counter()
            try:
                response = client.post(route, json=body)
            except httpx.HTTPError as exc:
                with lock:
                    failures.append(f"request {n}: {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - start
            problem = None
            if response.status_code != 200:
                problem = f"request {n}: HTTP {response.status_code}: {response.text[:200]}"
            elif rerank and not _check_rerank(response.json(), indices, expected[query], atol):
                problem = f"request {n}: rerank results differ from CrossEncoder.predict of their pairs"
            elif not rerank and not _check_embeddings(response.json(), indices, expected, atol):
                problem = f"request {n}: vectors differ from their texts' expected vectors"
            with lock:
                latencies.append(elapsed)
                if problem is not None:
                    failures.append(problem)
                    mismatches[0] += response.status_code == 200

    with httpx.Client(base_url=url, limits=limits, timeout=timeout_s) as client:
        threads = [threading.Thread(target=worker, args=(client,), name=f"load-{i}") for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return latencies, failures, mismatches[0]


def run_load(
    url: str, texts: Sequence[str], expected: np.ndarray, *, requests: int = 2000, concurrency: int = 32,
    atol: float = 1e-5, timeout_s: float = 60.0, seed: int = 0, rerank: bool = False, model: str | None = None,
) -> LoadResult:
    """Sends ``requests`` embedding (or rerank) requests from ``concurrency`` concurrent clients and checks every
    answer.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        texts: the pool requests draw their texts (and rerank queries: the first ``RERANK_QUERIES``) from.
        expected: ``[len(texts), dims]``, what the server should return for each text; for ``rerank``,
            ``[RERANK_QUERIES, len(texts)]``, the score of (query, text).
        requests: how many requests in all.
        concurrency: clients sending at once (each waits for its answer before its next request).
        atol: largest |difference| allowed between a returned and an expected value.
        timeout_s: per-request client timeout; a request that runs past it counts as lost.
        seed: which texts each request carries.
        rerank: send ``POST /v1/rerank`` (query ``n % RERANK_QUERIES``, the request's texts as documents).
        model: the ``model`` each request names (a server of several models), or ``None``.

    Returns:
        Counts, wall time, throughput, latency percentiles and the server's ``/health`` counters after the run.
    """
    plan = build_requests(requests, len(texts), seed)
    before = httpx.get(f"{url}/health", timeout=10).json()["stats"]
    start = time.perf_counter()
    latencies, failures, mismatched = _load(url, texts, expected, plan, concurrency, atol, timeout_s, rerank, model)
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health", timeout=10).json()["stats"]
    served = after["requests_served"] - before["requests_served"]
    batches = after["batches_run"] - before["batches_run"]
    millis = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    ok = requests - len(failures)
    return LoadResult(
        requests=requests,
        concurrency=concurrency,
        ok=ok,
        lost=len(failures) - mismatched,
        mismatched=mismatched,
        wall_s=round(wall, 3),
        throughput_rps=round(requests / wall, 1),
        latency_ms={name: round(float(np.percentile(millis, q)), 2)
                    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        server={"requests_served": served, "batches_run": batches,
                "mean_requests_per_batch": round(served / batches, 2) if batches else 0.0,
                "largest_batch_texts": after["largest_batch"]},
        first_failures=failures[:5],
    )


def rerank_scores(cross_encoder: Any, texts: Sequence[str]) -> np.ndarray:
    """``[RERANK_QUERIES, len(texts)]``: ``CrossEncoder.predict`` of (query, text) for the load test's queries."""
    pairs = [(texts[q], text) for q in range(RERANK_QUERIES) for text in texts]
    return np.asarray(cross_encoder.predict(pairs), dtype=np.float32).reshape(RERANK_QUERIES, len(texts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    parser.add_argument("--rerank", action="store_true", help="load POST /v1/rerank of a cross-encoder folder "
                                                              "instead of embeddings")
    parser.add_argument("--requests", type=int, default=2000, help="requests in all (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--texts", default=None, help="text file, one text per line (default: the shipped "
                                                      "400 sentences)")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="extra `deberta-onnx serve` flag, repeatable (e.g. --server-flag=--max-wait-ms=2)")
    args = parser.parse_args(argv)

    from deberta_onnx.runtime import CrossEncoder, Encoder
    from deberta_onnx.runtime.files import text_lines

    source = Path(args.texts) if args.texts else Path(__file__).parents[1] / "runtime" / "data" / "sentences.txt"
    texts = text_lines(source.read_bytes().decode("utf-8"))
    with ServerProcess(args.model_dir, *args.server_flag) as server:
        if args.rerank:
            expected = rerank_scores(CrossEncoder(args.model_dir), texts)
        else:
            normalize = httpx.get(f"{server.url}/health", timeout=10).json()["normalize"]
            expected = Encoder(args.model_dir).encode(texts, normalize=normalize)
        result = run_load(server.url, texts, expected, requests=args.requests, concurrency=args.concurrency,
                          rerank=args.rerank)
    report = {"model_dir": str(args.model_dir), "route": "/v1/rerank" if args.rerank else "/v1/embeddings",
              "server_flags": args.server_flag, **result.to_dict()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0 if result.lost == 0 and result.mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
