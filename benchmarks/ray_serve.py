"""Throughput of one `deberta-onnx serve` process against Ray Serve replicas, on this machine, in one run.

    python benchmarks/ray_serve.py MODEL_DIR --replicas 2 --requests 1000 --output ray-serve.json

Three servers, each load-tested in turn with benchmarks/load.py's client (every vector checked against
`Encoder.encode`), after a warm-up, for `--rounds` rounds interleaved so that a change in the machine's load
hits all of them alike:

- `server`: `deberta-onnx serve MODEL_DIR --threads T` (one process, one session of T threads; T = the CPUs);
- `ray-microbatch`: `deberta_onnx.runtime.ray.deployment`: R replicas of 1 thread, each running the project's
  app and micro-batcher as its ASGI ingress;
- `ray-serve-batch`: R replicas of 1 thread whose embeddings route merges requests with Ray Serve's own
  `@serve.batch` (same batch size and wait) instead: the alternative the deployment was chosen against.

Needs the ray, server and dev extras. Reports requests per second, latency percentiles, lost and mismatched
responses, each server's throughput relative to `server`, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.benchmarks.load import run_load
from deberta_onnx.runtime.server.testing import ServerProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_batch_deployment(model_dir: str, replicas: int, max_batch_size: int, max_wait_ms: float,
                            batch_size: int) -> Any:
    """Embeddings (and a /health of zeros for load.py) with Ray Serve's @serve.batch merging requests."""
    import asyncio

    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    class ServeBatchEmbedder:
        def __init__(self) -> None:
            from deberta_onnx.runtime import Encoder, EncoderConfig

            self.encoder = Encoder(model_dir, config=EncoderConfig(intra_op_threads=1))

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000)
        async def encode(self, requests: list[list[str]]) -> list[np.ndarray]:
            texts = [t for texts in requests for t in texts]
            vectors = await asyncio.to_thread(self.encoder.encode, texts, batch_size, True)
            out, start = [], 0
            for texts in requests:
                out.append(vectors[start:start + len(texts)])
                start += len(texts)
            return out

        async def __call__(self, request: Request) -> Response:
            from deberta_onnx.runtime.server.openai_api import embedding_response, parse_embedding_request

            if request.url.path == "/health":
                return JSONResponse({"stats": {"requests_served": 0, "batches_run": 0, "largest_batch": 0}})
            parsed = parse_embedding_request(await request.body(), max_inputs=2048,
                                             hidden_size=self.encoder.hidden_size)
            vectors = await self.encode(parsed.texts)
            body = embedding_response(vectors, token_counts=[0] * len(parsed.texts),
                                      encoding_format=parsed.encoding_format, model="m")
            return JSONResponse(body)

    return ServeBatchEmbedder.bind()  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="ONNX Runtime threads of the single server (default: the CPUs)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from deberta_onnx.runtime import Encoder
    from deberta_onnx.runtime.ray import deployment
    from deberta_onnx.runtime.server import ServerConfig

    texts = (Path(__file__).parents[1] / "runtime" / "data" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    expected = Encoder(args.model_dir).encode(texts, normalize=True)
    config = ServerConfig()
    ray.init(num_cpus=os.cpu_count(), object_store_memory=100 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ray_url = f"http://127.0.0.1:{port}"
    results: dict[str, list[dict[str, Any]]] = {"server": [], "ray-microbatch": [], "ray-serve-batch": []}

    def measure(name: str, url: str) -> None:
        run_load(url, texts, expected, requests=args.warmup, concurrency=args.concurrency)
        result = run_load(url, texts, expected, requests=args.requests, concurrency=args.concurrency)
        entry = {**result.to_dict(), "loadavg_1m": round(os.getloadavg()[0], 2)}
        entry.pop("server")
        results[name].append(entry)
        print(f"{name}: {result.throughput_rps} req/s, p50 {result.latency_ms['p50']} ms, p99 "
              f"{result.latency_ms['p99']} ms, lost {result.lost}, mismatched {result.mismatched}, load "
              f"{entry['loadavg_1m']}", file=sys.stderr, flush=True)

    try:
        for _ in range(args.rounds):
            with ServerProcess(args.model_dir, f"--threads={args.threads}") as server:
                measure("server", server.url)
            serve.run(deployment(args.model_dir, num_replicas=args.replicas, server_config=config), name="bench",
                      route_prefix="/")
            measure("ray-microbatch", ray_url)
            serve.delete("bench")
            serve.run(_serve_batch_deployment(str(args.model_dir), args.replicas, config.max_batch_size,
                                              config.max_wait_ms, config.batch_size), name="bench", route_prefix="/")
            measure("ray-serve-batch", ray_url)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    base = np.mean([r["throughput_rps"] for r in results["server"]])
    summary = {name: {"throughput_rps": round(float(np.mean([r["throughput_rps"] for r in runs])), 1),
                      "vs_server": round(float(np.mean([r["throughput_rps"] for r in runs]) / base), 2),
                      "p50_ms": round(float(np.mean([r["latency_ms"]["p50"] for r in runs])), 1),
                      "p99_ms": round(float(np.mean([r["latency_ms"]["p99"] for r in runs])), 1),
                      "lost": sum(r["lost"] for r in runs), "mismatched": sum(r["mismatched"] for r in runs)}
               for name, runs in results.items()}
    from deberta_onnx.runtime.installed import installed_versions

    report = {"model_dir": str(args.model_dir), "replicas": args.replicas, "server_threads": args.threads,
              "requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
              "cpus": os.cpu_count(), "versions": installed_versions(["ray", "onnxruntime", "starlette", "uvicorn"]),
              "summary": summary, "runs": results, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    bad = sum(s["lost"] + s["mismatched"] for s in summary.values())
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
