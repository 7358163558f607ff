"""``run_benchmark``: every configuration, interleaved in one process, on the grid and the corpus.

Interleaving (round-robin, starting order rotated each round) spreads a shared machine's disturbances over all
configurations alike, so the ratios against PyTorch hold even when absolute times drift.
"""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.runtime.contract import TOKENIZER_FILE
from deberta_onnx.runtime.manifest import load_manifest
from deberta_onnx.runtime.postprocess import row_cosine

from .backends import Backend, ThreadSetting, devices, runtime_backends, runtime_paths, torch_backends
from .config import BenchConfig, ModelSpec
from .environment import describe_environment, load_average
from .timing import RssSampler, Timer, rss_bytes
from .workloads import Shape, build_corpus, fit_vocab, token_lengths

__all__ = ["reference_checkpoint", "run_benchmark"]

_RANDOM = "random:"


@dataclass
class _Group:
    """Model folders exported from one source, with the PyTorch reference they are compared against."""

    source: str
    checkpoint: str
    specs: list[ModelSpec]
    manifest: Any
    backends: list[Backend] = field(default_factory=list)
    load_mb: dict[int, float] = field(default_factory=dict)
    # ONNX Runtime on CUDA: device memory each session added, at load and at its first calls of each shape (its
    # arena keeps what it grew to). Measured while nothing else runs, so it is this configuration's alone.
    gpu_held_mb: dict[int, float] = field(default_factory=dict)
    # PyTorch on CUDA: the peak its allocator reached during the current workload's own blocks of calls.
    torch_peak_mb: dict[int, float] = field(default_factory=dict)


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
    # TF32 for fp32 matrix products on CUDA, the same in PyTorch as in the runtime (BenchConfig.tf32).
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    torch.backends.cudnn.allow_tf32 = config.tf32
    load_at_start = load_average()
    with tempfile.TemporaryDirectory(prefix="deberta-onnx-bench-") as scratch:
        groups = _groups(config, Path(scratch))
        device_list = devices(config.device)
        rows: list[dict[str, Any]] = []
        for group in groups:
            _load_backends(group, config, device_list)
            first = group.specs[0].folder
            corpus: list[str] = []
            if config.corpus_size:
                from deberta_onnx.export.testing import shipped_sentences as sentences

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
        environment = describe_environment(config, groups, device_list)
        # Other processes' load makes absolute times drift; the 1-minute load average says how busy it was.
        environment["hardware"]["load_average"] = {"start": load_at_start, "end": load_average()}
        document: dict[str, Any] = {"environment": environment, "rows": rows}
    write_reports(document, config.out_dir, plot=config.plot)
    return document


def _groups(config: BenchConfig, scratch: Path) -> list[_Group]:
    """Models grouped by source; with ``reference`` set, all in one group compared against it."""
    by_source: dict[str, _Group] = {}
    for spec in config.models:
        manifest = load_manifest(spec.folder)
        source = config.reference or manifest.source.model
        if source not in by_source:
            by_source[source] = _Group(source=source, checkpoint="", specs=[], manifest=manifest)
        by_source[source].specs.append(spec)
    for group in by_source.values():
        group.checkpoint = reference_checkpoint(group.source, scratch)
    return list(by_source.values())


def reference_checkpoint(source: str, scratch: Path) -> str:
    """The manifest's source as a loadable checkpoint; ``random:SHAPE`` is rebuilt (seeded, so identical)."""
    if source.startswith(_RANDOM):
        from deberta_onnx.export.testing import build_random_checkpoint, quiet_libraries

        with quiet_libraries():
            return str(build_random_checkpoint(source[len(_RANDOM):], scratch / source[len(_RANDOM):]))
    return source


def _load_backends(group: _Group, config: BenchConfig, device_list: list[str]) -> None:
    manifest = group.manifest
    max_length = manifest.max_sequence_length
    shape_name = manifest.source.shape or group.source
    for device in device_list:
        before = rss_bytes()
        references: Sequence[Backend] = torch_backends(group.checkpoint, group.specs[0].folder, device=device,
                                                   model=f"pytorch ({shape_name})", max_length=max_length)
        for backend in references:
            group.load_mb[id(backend)] = (rss_bytes() - before) / 2**20
            group.backends.append(backend)
            before = rss_bytes()
        for spec in group.specs:
            variants = list(load_manifest(spec.folder).variants)
            if config.precisions is not None:
                variants = [v for v in variants if v in config.precisions]
            if spec.precisions is not None:
                variants = [v for v in variants if v in spec.precisions]
            threads = config.ort_threads or (ThreadSetting(intra_op_threads=config.threads),)
            for backend in _built_one_by_one(spec, variants, device, threads, config, group):
                group.backends.append(backend)


def _built_one_by_one(spec: ModelSpec, variants: Sequence[str], device: str, threads: Sequence[ThreadSetting],
                      config: BenchConfig, group: _Group) -> list[Backend]:
    """The runtime's backends of one folder, each made alone (with the spec's ``EncoderConfig`` fields), with the
    host and device memory its load added."""
    built: list[Backend] = []
    for variant in variants:
        for path in [p for p in runtime_paths(device) if config.paths is None or p in config.paths]:
            for setting in threads:
                before, device_before = rss_bytes(), _device_used_mb(device)
                (backend,) = runtime_backends(spec.folder, [variant], model=spec.label, device=device,
                                              threads=[setting], paths=[path], tf32=config.tf32,
                                              fields=dict(spec.fields))
                group.load_mb[id(backend)] = (rss_bytes() - before) / 2**20
                if device == "cuda":
                    group.gpu_held_mb[id(backend)] = _device_used_mb(device) - device_before
                built.append(backend)
    return built


def _reference_of(group: _Group, backend: Backend) -> Backend | None:
    """The PyTorch backend a configuration's speed is compared with: same device, same precision where
    PyTorch has it, else fp32."""
    torch_rows = [b for b in group.backends if b.engine == "pytorch" and b.device == backend.device]
    same = [b for b in torch_rows if b.precision == backend.precision]
    fp32 = [b for b in torch_rows if b.precision == "fp32"]
    return next(iter(same or fp32), None)


def _parity(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    live = np.abs(a).sum(1) + np.abs(e).sum(1) > 0  # all-padding rows are zero vectors on both sides
    cosine = row_cosine(a[live], e[live])
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
    group.torch_peak_mb.clear()
    outputs: dict[int, list[Any]] = {id(b): [None] * len(units) for b in group.backends}
    backends = group.backends
    step = 0
    for _ in range(rounds):
        for index, (work, sentences) in enumerate(units):
            shift = step % len(backends)
            step += 1
            for backend in backends[shift:] + backends[:shift]:
                key = id(backend)
                _reset_torch_peak(backend)
                with RssSampler() as sampler:
                    for _ in range(calls[key]):
                        outputs[key][index] = timers[key].call(work[key], sentences)
                _keep_torch_peak(group, backend)
                if key not in peaks or sampler.peak > peaks[key].peak:
                    peaks[key] = sampler
                bar.update(1)
    return timers, peaks, outputs


def _grid(group: _Group, shape: Shape, config: BenchConfig, bar: Any) -> list[dict[str, Any]]:
    model = group.manifest.model
    ids, mask = fit_vocab(shape, model, config.seed)
    work: dict[int, Callable[[], Any]] = {id(b): functools.partial(b.run, ids, mask) for b in group.backends}
    outputs: dict[int, np.ndarray] = {}
    calls: dict[int, int] = {}
    for backend in group.backends:
        timer = Timer(backend.sync)
        device_before = _device_used_mb(backend.device)
        outputs[id(backend)] = timer.call(work[id(backend)], shape.batch)  # first call: output for parity
        timer.warm_up(work[id(backend)], max(config.warmup - 1, 0))
        if config.warmup > 1:
            timer.call(work[id(backend)], shape.batch)
        _add_device_growth(group, backend, device_before)
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
        device_before = _device_used_mb(backend.device)
        backend.encode(corpus[: config.corpus_batch_size * 2], config.corpus_batch_size)
        _add_device_growth(group, backend, device_before)
    # The corpus goes in slices, each encoded by every backend in turn: a pass over 10,000 texts takes minutes,
    # and a shared machine's load changes over minutes. Each slice is a random sample of the corpus (its texts
    # are in random order), so batching by length within a slice works as it would on the whole.
    bounds = np.linspace(0, len(corpus), min(config.corpus_slices, len(corpus)) + 1).astype(int)
    units: list[tuple[dict[int, Callable[[], Any]], int]] = [
        ({id(b): functools.partial(b.encode, corpus[lo:hi], config.corpus_batch_size) for b in group.backends},
         int(hi - lo)) for lo, hi in itertools.pairwise(bounds)]
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
    held = group.torch_peak_mb if backend.engine == "pytorch" else group.gpu_held_mb
    row["gpu_mb"] = held.get(id(backend)) if backend.device == "cuda" else None
    fp16 = next((b for b in group.backends if b.engine == "pytorch" and b.precision == "fp16"
                 and b.device == backend.device), None)
    if fp16 is None:
        row["vs_pytorch_fp16"] = None
    else:
        other = timers[id(fp16)].samples.summary()
        row["vs_pytorch_fp16"] = other[key] / summary[key] if key == "p50_ms" else summary[key] / other[key]
    row["source"] = group.source
    row["random_weights"] = group.manifest.source.random_weights
    return row


def _device_used_mb(device: str) -> float:
    """Memory in use on the CUDA device, every process and allocator included (0 on the CPU)."""
    if device != "cuda":
        return 0.0
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _add_device_growth(group: _Group, backend: Backend, before_mb: float) -> None:
    """ONNX Runtime on CUDA: adds what the device gained over this backend's first calls of a shape (its arena
    grew by that, and keeps it) to the memory the configuration holds."""
    if backend.device == "cuda" and backend.engine != "pytorch":
        grown = max(_device_used_mb(backend.device) - before_mb, 0.0)
        group.gpu_held_mb[id(backend)] = group.gpu_held_mb.get(id(backend), 0.0) + grown


def _reset_torch_peak(backend: Backend) -> None:
    if backend.device == "cuda" and backend.engine == "pytorch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _keep_torch_peak(group: _Group, backend: Backend) -> None:
    """PyTorch on CUDA: the peak its caching allocator reached during this block of its own calls (reset just
    before it), kept as the configuration's largest over the workload's blocks."""
    if backend.device == "cuda" and backend.engine == "pytorch":
        import torch

        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        group.torch_peak_mb[id(backend)] = max(group.torch_peak_mb.get(id(backend), 0.0), peak)
