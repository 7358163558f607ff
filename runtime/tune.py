"""``engine="auto"``: which engine runs a folder's graph faster on this machine, by measurement, cached.

A choice is measured once (both engines, 1 text x 32 tokens and 8 texts x 128 tokens, interleaved, a few
repetitions) and written to a JSON file in the user's cache directory, keyed by the CPU (model name and flags), the
graph file's checksum, the precision, the thread count and the engines' versions: another machine, another
export, another setting or an upgrade measures again. ``deberta-onnx tune`` measures on purpose and writes the
same entry. Imports no engine itself: the loader hands it runners.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ENGINE_ONNXRUNTIME, ENGINE_OPENVINO
from .files import read_json_cache, write_json_cache
from .installed import DISTRIBUTION
from .runners import Runner, SplitRunner

__all__ = [
    "CALIBRATION_SHAPES",
    "SETTLE_S",
    "SPLIT_GAIN",
    "EngineChoice",
    "cached_choices",
    "choice_key",
    "choices_for",
    "engine_label",
    "lookup",
    "machine",
    "measure",
    "remember",
    "tune_file",
]

# (texts, tokens) per call: one short text (latency) and a batch (throughput), as in benchmarks/README.md.
CALIBRATION_SHAPES = ((1, 32), (8, 128))
_REPEATS = 3
# ``auto`` keeps both engines, each for the calls it is faster on, when each is at least this much faster than the
# other on one of the shapes (ONNX Runtime's int8 ahead on one short text, OpenVINO's on batches): below it the
# gain does not pay for the second engine's memory.
SPLIT_GAIN = 1.10
# Seconds between timed calls, longer than ONNX Runtime's threads spin after a call (measured: without it the engine
# timed right after ONNX Runtime took up to 1.5x longer on 2 cores).
SETTLE_S = 0.05


@dataclass(frozen=True, kw_only=True)
class EngineChoice:
    """The engine ``auto`` runs, and why.

    Attributes:
        engine: ``"onnxruntime"`` or ``"openvino"``: the engine for every call, or with ``small_engine`` for the
            calls above ``split_tokens``.
        reason: one sentence for ``deberta-onnx info`` and ``/health``.
        timings_ms: median milliseconds per call, ``{engine: {"1x32": ms, "8x128": ms}}``; empty when not measured.
        measured_at: when (UTC, ISO 8601); ``None`` when not measured.
        small_engine: the other engine, for calls of at most ``split_tokens`` padded tokens (batch x sequence);
            ``None``: one engine runs everything.
        split_tokens: where the calls divide, estimated from the measurements (see ``measure``).
    """

    engine: str
    reason: str
    timings_ms: Mapping[str, Mapping[str, float]]
    measured_at: str | None = None
    small_engine: str | None = None
    split_tokens: int | None = None

    @property
    def split(self) -> tuple[str, int] | None:
        """``(small_engine, split_tokens)`` when both engines are kept, else ``None``."""
        if self.small_engine is None or self.split_tokens is None:
            return None
        return self.small_engine, self.split_tokens


def _cpu() -> tuple[str, str]:
    """The CPU's model name and a digest of its flags (from /proc/cpuinfo; ``platform`` where it is absent)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []

    def field(*names: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(names)), "")

    flags = " ".join(sorted(set(field("flags", "Features").split())))
    name = field("model name") or platform.processor() or platform.machine()
    return name, hashlib.sha256(flags.encode()).hexdigest()[:16]


def machine() -> str:
    """This machine's CPU as the cache keys it: model name, flags digest and logical cores."""
    name, flags = _cpu()
    return f"{name} (flags {flags}, {os.cpu_count()} logical cores)"


def choice_key(graph_sha256: str, precision: str, threads: int | None, versions: Mapping[str, str | None]) -> str:
    """The cache key of one choice: machine, graph, precision, threads and engine versions."""
    parts = [machine(), graph_sha256, precision, str(threads), *(f"{k} {v}" for k, v in sorted(versions.items()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def tune_file(cache_dir: str | Path | None = None) -> Path:
    """The JSON file of measured choices: ``engine-choices.json`` in ``cache_dir``, by default ``deberta-onnx`` in
    the user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / DISTRIBUTION
    return Path(cache_dir) / "engine-choices.json"


def cached_choices(path: Path) -> dict[str, dict[str, Any]]:
    """Every entry of the choices file (an unreadable or foreign file counts as empty: it is only a cache)."""
    return read_json_cache(path)


def lookup(path: Path, key: str) -> EngineChoice | None:
    """The choice cached under ``key``, or ``None``."""
    entry = cached_choices(path).get(key)
    engines = (ENGINE_ONNXRUNTIME, ENGINE_OPENVINO)
    if not isinstance(entry, dict) or entry.get("engine") not in engines:
        return None
    small, split = entry.get("small_engine"), entry.get("split_tokens")
    if small is not None and not (small in engines and small != entry["engine"] and isinstance(split, int)
                                  and not isinstance(split, bool) and split > 0):
        return None
    return EngineChoice(engine=entry["engine"], reason=str(entry.get("reason", "")),
                        timings_ms=entry.get("timings_ms") or {}, measured_at=entry.get("measured_at"),
                        small_engine=small, split_tokens=split if small is not None else None)


def remember(path: Path, key: str, choice: EngineChoice, about: Mapping[str, Any]) -> None:
    """Writes ``choice`` under ``key`` (atomically; other entries kept), with ``about`` (folder, precision, ...)
    beside it for people reading the file."""
    entries = cached_choices(path)
    entries[key] = {**asdict(choice), **about}
    write_json_cache(path, entries)


def _feed(texts: int, tokens: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, max(6, vocab), size=(texts, tokens), dtype=np.int64)
    return ids, np.ones_like(ids)


def measure(runners: Mapping[str, Runner], *, vocab: int, repeats: int = _REPEATS,
            clock: Callable[[], float] = time.perf_counter,
            pause: Callable[[], None] = lambda: time.sleep(SETTLE_S)) -> EngineChoice:
    """Times each engine's runner on ``CALIBRATION_SHAPES`` (one warm-up call each, then ``repeats`` calls,
    the engines alternating, each call after a ``pause``) and picks the one with the lower geometric mean over the
    shapes, or both (``_split``) when each wins one shape by ``SPLIT_GAIN`` and the pair is also faster than the
    better engine alone on calls of both shapes in turn without pauses (``_split_pays``).

    Args:
        runners: ``{engine: runner}`` for the same graph and outputs.
        vocab: token ids are drawn below this.
        repeats: timed calls per engine and shape.
        clock: seconds, for tests.
        pause: before each timed call, so that one engine's call does not pay for the other's threads (ONNX
            Runtime's spin after a call by default, on the same cores).
    """
    timings: dict[str, dict[str, float]] = {name: {} for name in runners}
    feeds = {f"{texts}x{tokens}": _feed(texts, tokens, vocab) for texts, tokens in CALIBRATION_SHAPES}
    for shape, (ids, mask) in feeds.items():
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():
            runner.run(ids, mask)
        for _ in range(repeats):
            for name, runner in runners.items():
                pause()
                start = clock()
                runner.run(ids, mask)
                samples[name].append(clock() - start)
        for name, values in samples.items():
            timings[name][shape] = round(statistics.median(values) * 1000, 3)

    def score(name: str) -> float:
        return statistics.geometric_mean(max(v, 1e-6) for v in timings[name].values())

    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    best = min(runners, key=score)
    others = [name for name in runners if name != best]
    shapes = ", ".join(f"{shape} {' vs '.join(f'{timings[n][shape]:.1f}' for n in (best, *others))} ms"
                       for shape in timings[best])
    split = _split(timings)
    if split is not None:
        small, large, tokens = split
        paired = SplitRunner(runners[small], runners[large], tokens)
        mixed = {"both": _mixed(paired, feeds, repeats, clock, pause),
                 best: _mixed(runners[best], feeds, repeats, clock, pause)}
        pairs = [f"{shape} {timings[small][shape]:.1f} vs {timings[large][shape]:.1f} ms" for shape in timings[small]]
        if mixed["both"] < mixed[best]:
            reason = (f"measured on this CPU: {small} for calls of up to {tokens} tokens, {large} above ({small} vs "
                      f"{large}: {', '.join(pairs)}; both shapes in turn {mixed['both']:.1f} ms with both, "
                      f"{mixed[best]:.1f} ms with {best} alone)")
            return EngineChoice(engine=large, reason=reason, timings_ms=timings, measured_at=measured_at,
                                small_engine=small, split_tokens=tokens)
        shapes += (f"; each ahead on one shape, but both shapes in turn took {mixed['both']:.1f} ms with both "
                   f"against {mixed[best]:.1f} ms with {best} alone")
    reason = (f"measured faster on this CPU ({best}{''.join(' vs ' + n for n in others)}: {shapes})" if others
              else f"the only engine measured ({shapes})")
    return EngineChoice(engine=best, reason=reason, timings_ms=timings, measured_at=measured_at)


def _mixed(runner: Runner, feeds: Mapping[str, tuple[np.ndarray, np.ndarray]], repeats: int,
           clock: Callable[[], float], pause: Callable[[], None]) -> float:
    """Median milliseconds of one call of each shape in turn, back to back, as a server's mixed traffic comes."""
    samples = []
    for _ in range(repeats):
        pause()
        start = clock()
        for ids, mask in feeds.values():
            runner.run(ids, mask)
        samples.append(clock() - start)
    return round(statistics.median(samples) * 1000, 3)


def _split(timings: Mapping[str, Mapping[str, float]]) -> tuple[str, str, int] | None:
    """``(small_engine, large_engine, split_tokens)`` when two engines each win one of ``CALIBRATION_SHAPES`` by
    at least ``SPLIT_GAIN``, else ``None``.

    Where they divide is estimated from the two measurements: the log of the time ratio is taken as linear in
    the log of the call's tokens between the shapes, and the calls divide where the ratio crosses 1.
    """
    if len(timings) != 2:
        return None
    (small_shape, small_tokens), (large_shape, large_tokens) = (
        (f"{texts}x{tokens}", texts * tokens) for texts, tokens in CALIBRATION_SHAPES)
    first, second = timings
    try:
        ratios = [timings[first][shape] / timings[second][shape] for shape in (small_shape, large_shape)]
    except (KeyError, ZeroDivisionError):
        return None
    if ratios[0] <= 0 or ratios[1] <= 0:
        return None
    if ratios[0] * SPLIT_GAIN <= 1 and ratios[1] >= SPLIT_GAIN:
        small, large = first, second
    elif ratios[0] >= SPLIT_GAIN and ratios[1] * SPLIT_GAIN <= 1:
        small, large = second, first
    else:
        return None
    logs = [math.log(ratio) for ratio in ratios]
    span = math.log(large_tokens) - math.log(small_tokens)
    crossing = math.log(small_tokens) + (0.0 - logs[0]) * span / (logs[1] - logs[0])
    return small, large, round(math.exp(crossing))


def engine_label(entry: Mapping[str, Any]) -> str:
    """What a cached choice runs, as ``LoadedModel.engine`` says it: one engine, or ``onnxruntime+openvino``."""
    if entry.get("small_engine"):
        return f"{ENGINE_ONNXRUNTIME}+{ENGINE_OPENVINO}"
    return str(entry.get("engine"))


def choices_for(path: Path, graphs: Mapping[str, str]) -> list[dict[str, Any]]:
    """The cached choices for this machine and any of ``graphs`` (``{sha256: variant name}``), made with the
    engine versions installed now: what ``auto`` would run, for ``deberta-onnx info``."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    here = machine()
    found = []
    for entry in cached_choices(path).values():
        if not isinstance(entry, dict) or entry.get("machine") != here or entry.get("graph_sha256") not in graphs:
            continue
        versions = entry.get("versions") or {}
        if any(versions.get(name) != version(name) for name in ("onnxruntime", "openvino")):
            continue
        found.append({**entry, "variant": graphs[entry["graph_sha256"]]})
    return found
