"""The one timing helper every benchmark here uses: warm-up, ``perf_counter``, CUDA sync, p50/p95, peak RSS.

Scripts in this folder time their calls with ``time_calls`` (or ``Timer`` when they interleave several
configurations and collect samples round by round) and never call ``perf_counter`` themselves, so every figure
in ``benchmarks/results/`` is measured the same way. The one exception is ``load.py``, a load generator that
times each HTTP request inside its asyncio client, from send to answer.

Each timed call starts after a pause of ``SETTLE_S``: after a call, ONNX Runtime's threads (and PyTorch's OpenMP
threads) spin on the cores for a while by default, and in an interleaved run the next configuration's call paid for
it. Measured on 2 cores, base shape, int8-static: OpenVINO's 1 x 32 call timed right after ONNX Runtime's took
25.1 ms, and 16.1 ms after a 50 ms pause (``benchmarks/engines.py``). Figures recorded before the pause came in
(2026-12-07) carry that bias on the short shapes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Seconds before each timed call (see the module docstring): the pause `auto`'s own measurement takes, longer than
# ONNX Runtime's threads spin after a call.
from deberta_onnx.runtime.tune import SETTLE_S

__all__ = ["SETTLE_S", "RssSampler", "Samples", "Timer", "cuda_synchronizer", "rss_bytes", "time_calls"]


@dataclass
class Samples:
    """Wall-clock seconds of individual calls and how many sentences each call encoded."""

    seconds: list[float] = field(default_factory=list)
    sentences: list[int] = field(default_factory=list)

    def add(self, seconds: float, sentences: int) -> None:
        self.seconds.append(seconds)
        self.sentences.append(sentences)

    def summary(self) -> dict[str, Any]:
        """p50/p95/mean latency in ms and sentences per second (all sentences over all seconds)."""
        if not self.seconds:
            raise ValueError("no samples were taken; run at least one timed call")
        values = np.asarray(self.seconds, dtype=np.float64)
        total = float(values.sum())
        return {
            "calls": len(values),
            "p50_ms": float(np.percentile(values, 50) * 1e3),
            "p95_ms": float(np.percentile(values, 95) * 1e3),
            "mean_ms": float(values.mean() * 1e3),
            "total_s": total,
            "sentences_per_s": float(sum(self.sentences) / total) if total > 0 else float("inf"),
        }


class Timer:
    """Times calls of one configuration; ``sync`` runs before the clock starts and before it stops.

    Args:
        sync: waits for queued device work (``torch.cuda.synchronize`` on CUDA); ``None`` on CPU, where every
            call returns with its result computed.
        settle_s: pause before each timed call, so that the previous call's spinning threads have stopped.
    """

    def __init__(self, sync: Callable[[], None] | None = None, settle_s: float = SETTLE_S) -> None:
        self.sync = sync
        self.settle_s = settle_s
        self.samples = Samples()

    def call(self, fn: Callable[[], Any], sentences: int) -> Any:
        """Runs ``fn`` once after the pause, records its time against ``sentences``, and returns its result."""
        if self.settle_s > 0:
            time.sleep(self.settle_s)
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        result = fn()
        if self.sync is not None:
            self.sync()
        self.samples.add(time.perf_counter() - start, sentences)
        return result

    def warm_up(self, fn: Callable[[], Any], calls: int) -> None:
        """Untimed calls: first-run allocations, kernel selection and thread-pool start-up stay out of the figures."""
        for _ in range(calls):
            fn()
        if self.sync is not None:
            self.sync()


def time_calls(fn: Callable[[], Any], *, sentences: int, warmup: int = 3, repeats: int = 20,
               sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Warms up, then times ``repeats`` calls of ``fn``; returns ``Samples.summary()``.

    Args:
        fn: the work to time (one model call, or one whole encode).
        sentences: sentences one call encodes, for sentences per second.
        warmup: untimed calls first.
        repeats: timed calls.
        sync: see ``Timer``.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timer = Timer(sync)
    timer.warm_up(fn, warmup)
    for _ in range(repeats):
        timer.call(fn, sentences)
    return timer.samples.summary()


def cuda_synchronizer(device: str) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device, ``None`` for the CPU (nothing to wait for)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.synchronize


def rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


class RssSampler:
    """Samples this process's RSS in a background thread while the ``with`` block runs; ``peak`` is the maximum.

    ``ru_maxrss`` only ever grows over the life of a process, so it cannot tell apart configurations that run
    one after another in one process; sampling can.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
