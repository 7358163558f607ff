"""``engine="auto"``: which engine runs a folder's graph faster on this machine, by measurement, cached.

A choice is measured once (both engines, 1 text x 32 tokens and 8 texts x 128 tokens, interleaved, a few
repetitions) and written to a JSON file in the user's cache directory, keyed by the CPU (model name and flags), the
graph file's checksum, the precision, the thread count and the engines' versions: another machine, another
export, another setting or an upgrade measures again. ``deberta-onnx tune`` measures on purpose and writes the
same entry. Imports no engine itself: the loader hands it runners.
"""

from __future__ import annotations

import hashlib
import json
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
from .files import atomic_write
from .installed import DISTRIBUTION
from .runners import Runner

__all__ = [
    "CALIBRATION_SHAPES",
    "EngineChoice",
    "cached_choices",
    "choice_key",
    "choices_for",
    "lookup",
    "machine",
    "measure",
    "remember",
    "tune_file",
]

# (texts, tokens) per call: one short text (latency) and a batch (throughput), as in benchmarks/README.md.
CALIBRATION_SHAPES = ((1, 32), (8, 128))
_REPEATS = 3


@dataclass(frozen=True, kw_only=True)
class EngineChoice:
    """The engine ``auto`` runs, and why.

    Attributes:
        engine: ``"onnxruntime"`` or ``"openvino"``.
        reason: one sentence for ``deberta-onnx info`` and ``/health``.
        timings_ms: median milliseconds per call, ``{engine: {"1x32": ms, "8x128": ms}}``; empty when not measured.
        measured_at: when (UTC, ISO 8601); ``None`` when not measured.
    """

    engine: str
    reason: str
    timings_ms: Mapping[str, Mapping[str, float]]
    measured_at: str | None = None


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(path: Path, key: str) -> EngineChoice | None:
    """The choice cached under ``key``, or ``None``."""
    entry = cached_choices(path).get(key)
    if not isinstance(entry, dict) or entry.get("engine") not in (ENGINE_ONNXRUNTIME, ENGINE_OPENVINO):
        return None
    return EngineChoice(engine=entry["engine"], reason=str(entry.get("reason", "")),
                        timings_ms=entry.get("timings_ms") or {}, measured_at=entry.get("measured_at"))


def remember(path: Path, key: str, choice: EngineChoice, about: Mapping[str, Any]) -> None:
    """Writes ``choice`` under ``key`` (atomically; other entries kept), with ``about`` (folder, precision, ...)
    beside it for people reading the file."""
    entries = cached_choices(path)
    entries[key] = {**asdict(choice), **about}
    text = json.dumps(entries, indent=2, sort_keys=True)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _feed(texts: int, tokens: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, max(6, vocab), size=(texts, tokens), dtype=np.int64)
    return ids, np.ones_like(ids)


def measure(runners: Mapping[str, Runner], *, vocab: int, repeats: int = _REPEATS,
            clock: Callable[[], float] = time.perf_counter) -> EngineChoice:
    """Times each engine's runner on ``CALIBRATION_SHAPES`` (one warm-up call each, then ``repeats`` calls,
    the engines alternating) and picks the one with the lower geometric mean over the shapes.

    Args:
        runners: ``{engine: runner}`` for the same graph and outputs.
        vocab: token ids are drawn below this.
        repeats: timed calls per engine and shape.
        clock: seconds, for tests.
    """
    timings: dict[str, dict[str, float]] = {name: {} for name in runners}
    for texts, tokens in CALIBRATION_SHAPES:
        ids, mask = _feed(texts, tokens, vocab)
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():
            runner.run(ids, mask)
        for _ in range(repeats):
            for name, runner in runners.items():
                start = clock()
                runner.run(ids, mask)
                samples[name].append(clock() - start)
        for name, values in samples.items():
            timings[name][f"{texts}x{tokens}"] = round(statistics.median(values) * 1000, 3)

    def score(name: str) -> float:
        return statistics.geometric_mean(max(v, 1e-6) for v in timings[name].values())

    best = min(runners, key=score)
    others = [name for name in runners if name != best]
    shapes = ", ".join(f"{shape} {' vs '.join(f'{timings[n][shape]:.1f}' for n in (best, *others))} ms"
                       for shape in timings[best])
    reason = (f"measured faster on this CPU ({best}{''.join(' vs ' + n for n in others)}: {shapes})" if others
              else f"the only engine measured ({shapes})")
    return EngineChoice(engine=best, reason=reason, timings_ms=timings,
                        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


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
