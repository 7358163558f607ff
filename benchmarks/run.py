"""``run_benchmark``: every configuration, interleaved in one process, on the grid and the corpus.

Interleaving (round-robin, starting order rotated each round) spreads a shared machine's disturbances over all
configurations alike, so the ratios against PyTorch hold even when absolute times drift.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.runtime import load_manifest
from deberta_onnx.runtime.contract import TOKENIZER_FILE

from .backends import Backend, ThreadSetting, devices, runtime_backends, runtime_paths, torch_backends
from .timing import RssSampler, Timer, rss_bytes
from .workloads import DEFAULT_GRID, QUICK_GRID, Shape, build_corpus, token_lengths

__all__ = ["BenchConfig", "ModelSpec", "run_benchmark"]

_RANDOM = "random:"


@dataclass(frozen=True)
class ModelSpec:
    """A model folder to benchmark, and the label its rows carry (default: the folder's name)."""

    folder: Path
    label: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``DIR`` or ``LABEL=DIR``."""
        label, sep, folder = text.partition("=")
        if not sep:
            label, folder = Path(text).name, text
        if not label or not folder:
            raise ValueError(f"model {text!r}: give a folder, or LABEL=FOLDER")
        return cls(folder=Path(folder), label=label)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Options of ``run_benchmark``; the flags of ``deberta-onnx bench`` map one-to-one onto these fields.

    Attributes:
        models: model folders written by ``deberta-onnx export``. Folders exported from the same source share
            one PyTorch reference, so an optimised and a plain export of one checkpoint sit in one table.
        out_dir: where ``results.json``, ``results.md`` and ``throughput.png`` go.
        reference: the PyTorch checkpoint every model is compared with, in one table (the parity columns show
            whether they really hold its weights); default each manifest's source (``random:SHAPE`` sources are
            rebuilt: they are deterministic), one table per source.
        shapes: the batch x sequence grid; the second half of each batch's rows is padded.
        corpus_size: texts in the realistic corpus (0 skips it).
        corpus_batch_size: texts per model call when encoding the corpus, for every backend.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA too where onnxruntime-gpu and torch see a GPU).
        precisions: variants of the model folders to run (default all of them).
        paths: runtime run paths to run (``plain``, ``iobinding``; default all the runtime offers).
        threads: intra-op threads for both ONNX Runtime and PyTorch (default: ONNX Runtime's and torch's own).
        ort_threads: ONNX Runtime thread settings to compare, each a configuration of its own (default: one,
            from ``threads``); see ``ThreadSetting.parse``.
        warmup: untimed calls per configuration and shape before timing.
        min_time_s: seconds of timed calls to aim for per configuration and shape (within min/max calls).
        min_calls / max_calls: bounds on the timed calls per configuration and shape.
        rounds: the timed calls are split into this many interleaved rounds.
        corpus_rounds: timed passes over the corpus per configuration.
        corpus_slices: the corpus is timed in this many slices, each encoded by every configuration in turn
            (p50/p95 of corpus rows are per slice).
        plot: write the PNG (needs matplotlib).
        seed: seeds the grid's ids and the corpus.
        progress: show progress bars.
    """

    models: tuple[ModelSpec, ...]
    out_dir: Path
    reference: str | None = None
    shapes: tuple[Shape, ...] = DEFAULT_GRID
    corpus_size: int = 10_000
    corpus_batch_size: int = 32
    device: str = "auto"
    precisions: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    threads: int | None = None
    ort_threads: tuple[ThreadSetting, ...] | None = None
    warmup: int = 2
    min_time_s: float = 3.0
    min_calls: int = 3
    max_calls: int = 200
    rounds: int = 3
    corpus_rounds: int = 1
    corpus_slices: int = 10
    plot: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model folder to benchmark")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        for name in ("corpus_size", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("corpus_batch_size", "min_calls", "rounds", "corpus_rounds", "corpus_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_calls < self.min_calls:
            raise ValueError(f"max_calls ({self.max_calls}) must be >= min_calls ({self.min_calls})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")
        if self.paths is not None:
            unknown = set(self.paths) - {"plain", "iobinding"}
            if unknown:
                raise ValueError(f"unknown run path(s) {sorted(unknown)}; choose from plain, iobinding")
        if not self.shapes and not self.corpus_size:
            raise ValueError("nothing to run: give at least one shape or a corpus size > 0")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """The CI mode: two small shapes, a 200-text corpus, few calls; seconds on a tiny model."""
        settings: dict[str, Any] = {"shapes": QUICK_GRID, "corpus_size": 200, "warmup": 1, "min_time_s": 0.2,
                                    "min_calls": 3, "max_calls": 10, "rounds": 2, "corpus_slices": 4}
        settings.update(overrides)
        return cls(**settings)


@dataclass
class _Group:
    """Model folders exported from one source, with the PyTorch reference they are compared against."""

    source: str
    checkpoint: str
    specs: list[ModelSpec]
    manifest: Any
    backends: list[Backend] = field(default_factory=list)
    load_mb: dict[int, float] = field(default_factory=dict)


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Runs every configuration on the grid and the corpus and writes JSON, markdown and (optionally) a PNG.

    Returns:
        The document written to ``results.json``: ``environment`` (versions, hardware, settings) and ``rows``
        (one per model x workload x configuration).

    Raises:
        ModelFolderError: a model folder is missing or broken.
        ValueError: inconsistent options.
    """
    import torch
    from tqdm.auto import tqdm

    from .report import write_reports

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    load_at_start = _load_average()
    with tempfile.TemporaryDirectory(prefix="deberta-onnx-bench-") as scratch:
        groups = _groups(config, Path(scratch))
        device_list = devices(config.device)
        rows: list[dict[str, Any]] = []
        for group in groups:
            _load_backends(group, config, device_list)
            first = group.specs[0].folder
            corpus: list[str] = []
            if config.corpus_size:
                from deberta_onnx.export import shipped_sentences as sentences

                corpus = build_corpus(sentences(), first / TOKENIZER_FILE, size=config.corpus_size, seed=config.seed)
            steps = len(config.shapes) * config.rounds * len(group.backends)
            if corpus:
                steps += config.corpus_rounds * min(config.corpus_slices, len(corpus)) * len(group.backends)
            with tqdm(total=steps, desc=f"bench {group.specs[0].label}", unit="step",
                      disable=not config.progress) as bar:
                for shape in config.shapes:
                    rows += _grid(group, shape, config, bar)
                if corpus:
                    rows += _corpus(group, corpus, config, bar, first / TOKENIZER_FILE)
            for backend in group.backends:
                backend.close()
        document = {"environment": _environment(config, groups, device_list), "rows": rows}
        # Other processes' load makes absolute times drift; the 1-minute load average says how busy it was.
        document["environment"]["hardware"]["load_average"] = {"start": load_at_start, "end": _load_average()}
    write_reports(document, config.out_dir, plot=config.plot)
    return document


def _groups(config: BenchConfig, scratch: Path) -> list[_Group]:
    """Models grouped by source; with ``reference`` set, all in one group compared against it."""
    by_source: dict[str, _Group] = {}
    for spec in config.models:
        manifest = load_manifest(spec.folder)
        source = config.reference or str(manifest.data["source"]["model"])
        if source not in by_source:
            by_source[source] = _Group(source=source, checkpoint="", specs=[], manifest=manifest)
        by_source[source].specs.append(spec)
    for group in by_source.values():
        group.checkpoint = _reference_checkpoint(group.source, scratch)
    return list(by_source.values())


def _reference_checkpoint(source: str, scratch: Path) -> str:
    """The manifest's source as a loadable checkpoint; ``random:SHAPE`` is rebuilt (seeded, so identical)."""
    if source.startswith(_RANDOM):
        from deberta_onnx.export import build_random_checkpoint, quiet_libraries

        with quiet_libraries():
            return str(build_random_checkpoint(source[len(_RANDOM):], scratch / source[len(_RANDOM):]))
    return source


def _load_backends(group: _Group, config: BenchConfig, device_list: list[str]) -> None:
    manifest = group.manifest
    max_length = manifest.max_sequence_length
    shape_name = manifest.data["source"].get("shape") or group.source
    for device in device_list:
        before = rss_bytes()
        for backend in torch_backends(group.checkpoint, group.specs[0].folder, model=f"pytorch ({shape_name})",
                                      device=device, max_length=max_length):
            group.load_mb[id(backend)] = (rss_bytes() - before) / 2**20
            group.backends.append(backend)
            before = rss_bytes()
        for spec in group.specs:
            variants = list(load_manifest(spec.folder).variants)
            if config.precisions is not None:
                variants = [v for v in variants if v in config.precisions]
            before = rss_bytes()
            threads = config.ort_threads or (ThreadSetting(intra_op_threads=config.threads),)
            for backend in runtime_backends(spec.folder, variants, model=spec.label, device=device,
                                            threads=threads, paths=config.paths):
                group.load_mb[id(backend)] = (rss_bytes() - before) / 2**20
                group.backends.append(backend)
                before = rss_bytes()


def _reference_of(group: _Group, backend: Backend) -> Backend | None:
    """The PyTorch backend a configuration's speed is compared with: same device, same precision where
    PyTorch has it, else fp32."""
    torch_rows = [b for b in group.backends if b.engine == "pytorch" and b.device == backend.device]
    same = [b for b in torch_rows if b.precision == backend.precision]
    fp32 = [b for b in torch_rows if b.precision == "fp32"]
    return (same or fp32 or [None])[0]


def _parity(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1)
    live = norms > 0  # all-padding rows are zero vectors on both sides
    cosine = (a * e).sum(1)[live] / norms[live]
    return {"min_cosine": float(cosine.min()) if cosine.size else 1.0,
            "max_abs_diff": float(np.abs(a - e).max()) if a.size else 0.0}


def _interleaved(group: _Group, rounds: int, bar: Any, calls: dict[int, int],
                 units: Sequence[tuple[dict[int, Callable[[], Any]], int]]
                 ) -> tuple[dict[int, Timer], dict[int, RssSampler], dict[int, list[Any]]]:
    """Times every backend on every unit of work (``(work per backend, sentences per call)``), unit after unit,
    round after round, the backends' order rotated at each step, so that a machine's drift over a long run
    reaches all backends alike. ``calls[id]`` calls per backend and unit. Returns the timers, the block with the
    highest RSS per backend, and each backend's last output per unit."""
    timers = {id(b): Timer(b.sync) for b in group.backends}
    peaks: dict[int, RssSampler] = {}
    outputs: dict[int, list[Any]] = {id(b): [None] * len(units) for b in group.backends}
    backends = group.backends
    step = 0
    for _ in range(rounds):
        for index, (work, sentences) in enumerate(units):
            shift = step % len(backends)
            step += 1
            for backend in backends[shift:] + backends[:shift]:
                key = id(backend)
                _reset_gpu_peak(backend)
                with RssSampler() as sampler:
                    for _ in range(calls[key]):
                        outputs[key][index] = timers[key].call(work[key], sentences)
                if key not in peaks or sampler.peak > peaks[key].peak:
                    peaks[key] = sampler
                bar.update(1)
    return timers, peaks, outputs


def _grid(group: _Group, shape: Shape, config: BenchConfig, bar: Any) -> list[dict[str, Any]]:
    model = group.manifest.model
    ids, mask = _fit_vocab(shape, model, config.seed)
    work = {id(b): (lambda b=b: b.run(ids, mask)) for b in group.backends}
    outputs: dict[int, np.ndarray] = {}
    calls: dict[int, int] = {}
    for backend in group.backends:
        timer = Timer(backend.sync)
        outputs[id(backend)] = timer.call(work[id(backend)], shape.batch)  # first call: output for parity
        timer.warm_up(work[id(backend)], max(config.warmup - 1, 0))
        if config.warmup > 1:
            timer.call(work[id(backend)], shape.batch)
        per_call = timer.samples.seconds[-1]
        total = min(max(math.ceil(config.min_time_s / max(per_call, 1e-6)), config.min_calls), config.max_calls)
        calls[id(backend)] = max(1, math.ceil(total / config.rounds))
    timers, peaks, _ = _interleaved(group, config.rounds, bar, calls, [(work, shape.batch)])
    rows = []
    for backend in group.backends:
        extra = {"workload": "grid", "shape": str(shape), "batch": shape.batch, "sequence": shape.sequence,
                 "padded_rows": int((mask.sum(1) < shape.sequence).sum())}
        rows.append(_row(group, backend, timers, peaks, outputs, extra, key="p50_ms"))
    return rows


def _corpus(group: _Group, corpus: list[str], config: BenchConfig, bar: Any, tokenizer: Path) -> list[dict[str, Any]]:
    for backend in group.backends:  # warm-up on a slice: thread pools, allocators, first-shape kernels
        backend.encode(corpus[: config.corpus_batch_size * 2], config.corpus_batch_size)
    # The corpus goes in slices, each encoded by every backend in turn: a pass over 10,000 texts takes minutes,
    # and a shared machine's load changes over minutes. Each slice is a random sample of the corpus (its texts
    # are in random order), so batching by length within a slice works as it would on the whole.
    bounds = np.linspace(0, len(corpus), min(config.corpus_slices, len(corpus)) + 1).astype(int)
    units = [({id(b): (lambda b=b, lo=lo, hi=hi: b.encode(corpus[lo:hi], config.corpus_batch_size))
               for b in group.backends}, int(hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    calls = {id(b): 1 for b in group.backends}
    timers, peaks, sliced = _interleaved(group, config.corpus_rounds, bar, calls, units)
    outputs = {key: np.concatenate(parts) for key, parts in sliced.items()}
    lengths = token_lengths(tokenizer, corpus)
    stats = {"texts": len(corpus), "tokens_min": int(lengths.min()), "tokens_median": float(np.median(lengths)),
             "tokens_p90": float(np.percentile(lengths, 90)), "tokens_max": int(lengths.max()),
             "tokens_mean": float(lengths.mean())}
    rows = []
    for backend in group.backends:
        extra = {"workload": "corpus", "shape": f"corpus {len(corpus)}", "batch": config.corpus_batch_size,
                 "sequence": None, "corpus": stats}
        rows.append(_row(group, backend, timers, peaks, outputs, extra, key="sentences_per_s"))
    return rows


def _fit_vocab(shape: Shape, model: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    from .workloads import grid_batch

    return grid_batch(shape, vocab=int(model["vocab_size"]), pad_id=int(model["pad_token_id"]), seed=seed)


def _row(group: _Group, backend: Backend, timers: dict[int, Timer], peaks: dict[int, RssSampler],
         outputs: dict[int, np.ndarray], extra: dict[str, Any], *, key: str) -> dict[str, Any]:
    summary = timers[id(backend)].samples.summary()
    row: dict[str, Any] = {**backend.describe(), **extra, **summary}
    reference = _reference_of(group, backend)
    fp32 = next((b for b in group.backends if b.engine == "pytorch" and b.precision == "fp32"
                 and b.device == backend.device), None)
    for name, against in (("vs_pytorch", reference), ("vs_pytorch_fp32", fp32)):
        if against is None:
            row[name] = None
            continue
        other = timers[id(against)].samples.summary()
        # Grid: ratio of median latencies (robust on a shared machine); corpus: ratio of throughputs.
        row[name] = other[key] / summary[key] if key == "p50_ms" else summary[key] / other[key]
    row["vs_pytorch_against"] = reference.label if reference is not None else None
    if fp32 is not None:
        row.update(_parity(outputs[id(backend)], outputs[id(fp32)]))
    else:
        row.update({"min_cosine": None, "max_abs_diff": None})
    row["rss_peak_mb"] = peaks[id(backend)].peak / 2**20
    row["rss_load_mb"] = group.load_mb.get(id(backend))
    row["gpu_mb"] = _gpu_peak_mb(backend)
    row["source"] = group.source
    row["random_weights"] = bool(group.manifest.data["source"].get("random_weights"))
    return row


def _reset_gpu_peak(backend: Backend) -> None:
    if backend.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(backend: Backend) -> float | None:
    """PyTorch: its allocator's peak during the configuration's last round. ONNX Runtime's allocator is
    invisible to torch, so for it the device-wide memory in use (all loaded models included)."""
    if backend.device != "cuda":
        return None
    import torch

    if backend.engine == "pytorch":
        return torch.cuda.max_memory_allocated() / 2**20
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _environment(config: BenchConfig, groups: Sequence[_Group], device_list: list[str]) -> dict[str, Any]:
    import onnxruntime as ort
    import psutil
    import torch

    from deberta_onnx.runtime.utils import installed_versions as _versions

    versions = _versions(("deberta-onnx", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tokenizers",
                          "numpy"))
    hardware: dict[str, Any] = {
        "cpu": _cpu_name(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }
    if "cuda" in device_list:
        hardware["gpu"] = torch.cuda.get_device_name(0)
    models = []
    for group in groups:
        source = group.manifest.data["source"]
        for spec in group.specs:
            manifest = load_manifest(spec.folder)
            models.append({"label": spec.label, "folder": str(spec.folder), "source": group.source,
                           "shape": source.get("shape"), "random_weights": bool(source.get("random_weights")),
                           "variants": sorted(manifest.variants),
                           "optimization": manifest.data.get("optimization")})
    settings = {k: v for k, v in config.__dict__.items() if k not in ("models", "out_dir", "shapes", "ort_threads")}
    settings["shapes"] = [str(s) for s in config.shapes]
    settings["ort_threads"] = [str(t) for t in config.ort_threads] if config.ort_threads else None
    settings["torch_threads"] = torch.get_num_threads()
    settings["runtime_paths"] = sorted(runtime_paths())
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["deberta-onnx", *sys.argv[1:]]) if sys.argv and "deberta-onnx" in sys.argv[0] else None,
        "versions": versions,
        "onnxruntime_providers": ort.get_available_providers(),
        "hardware": hardware,
        "devices": device_list,
        "models": models,
        "random_weights": any(m["random_weights"] for m in models),
        "settings": settings,
    }


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
