"""Chunked ``semantic_search`` against the brute force it replaces (one full score matrix, then a sort), on one
random corpus, in one run.

    python benchmarks/search.py                                   # 1,000,000 x 128 corpus, 100 queries
    python benchmarks/search.py --rows 200000 --dim 768 --queries 32

The corpus is written to a temporary .npy and memory-mapped, as a real one would be. Reports both times, the
peak memory numpy allocated in each (tracemalloc), whether the rankings agree, and the ratios. Absolute times
depend on what else the machine runs; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.benchmarks.timing import Timer
from deberta_onnx.runtime import semantic_search


def _measure(run: Callable[[], Any]) -> tuple[Any, float, int]:
    tracemalloc.start()
    timer = Timer()
    try:
        result = timer.call(run, 1)
        seconds = timer.samples.seconds[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def _brute_force(queries: np.ndarray, corpus: np.ndarray, top_k: int) -> np.ndarray:
    rows = np.asarray(corpus, dtype=np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    scores = unit @ rows.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :top_k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="corpus vectors (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=128, help="vector length (default 128)")
    parser.add_argument("--queries", type=int, default=100, help="query vectors (default 100)")
    parser.add_argument("--top-k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="deberta-onnx-search-") as scratch:
        path = Path(scratch) / "corpus.npy"
        np.save(path, rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        corpus = np.load(path, mmap_mode="r")
        hits, chunked_s, chunked_peak = _measure(lambda: semantic_search(queries, corpus, top_k=args.top_k))
        top, brute_s, brute_peak = _measure(lambda: _brute_force(queries, corpus, args.top_k))
    same = all([h.index for h in row] == list(map(int, expected)) for row, expected in zip(hits, top))
    result = {
        "rows": args.rows, "dim": args.dim, "queries": args.queries, "top_k": args.top_k,
        "chunked_seconds": round(chunked_s, 3), "brute_force_seconds": round(brute_s, 3),
        "chunked_peak_mb": round(chunked_peak / 1e6, 1), "brute_force_peak_mb": round(brute_peak / 1e6, 1),
        "same_ranking": same,
        "time_ratio_brute_over_chunked": round(brute_s / chunked_s, 2),
        "memory_ratio_brute_over_chunked": round(brute_peak / chunked_peak, 2),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
