"""``BenchConfig`` and ``ModelSpec``: what ``run_benchmark`` runs. The flags of ``deberta-onnx bench`` map onto
these fields and take their defaults from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.checks import check_positive_int
from deberta_onnx.runtime.contract import PRECISIONS

from .backends import RUN_PATHS, ThreadSetting
from .workloads import DEFAULT_GRID, QUICK_GRID, Shape

__all__ = ["BenchConfig", "ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A model folder to benchmark, the label its rows carry (default: the folder's name), which of its
    precision variants to run (default: as ``BenchConfig.precisions`` says), and ``EncoderConfig`` fields its
    configurations load with (default none: ``EncoderConfig``'s defaults)."""

    folder: Path
    label: str
    precisions: tuple[str, ...] | None = None
    fields: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``DIR`` or ``LABEL=DIR``, either followed by ``:PRECISION[,PRECISION]`` (``cuda16=models/b:fp16``)."""
        precisions = None
        head, sep, tail = text.rpartition(":")
        if sep and tail and all(name in PRECISIONS for name in tail.split(",")):
            text, precisions = head, tuple(tail.split(","))
        label, sep, folder = text.partition("=")
        if not sep:
            label, folder = Path(text).name, text
        if not label or not folder:
            raise ValueError(f"model {text!r}: give a folder, or LABEL=FOLDER (and :PRECISION,... to run only those)")
        return cls(folder=Path(folder), label=label, precisions=precisions)

    def with_field(self, text: str) -> ModelSpec:
        """A copy with one more ``EncoderConfig`` field, from ``FIELD=VALUE`` (``none``, ints and ``true`` /
        ``false`` are read as such, the rest as text)."""
        name, sep, raw = text.partition("=")
        if not sep or not name:
            raise ValueError(f"encoder config {text!r}: give FIELD=VALUE, e.g. cpu_arena=next-power-of-two")
        lowered = raw.strip().lower()
        value: Any = {"none": None, "true": True, "false": False}.get(lowered, raw)
        if value is raw and lowered.lstrip("-").isdigit():
            value = int(lowered)
        return ModelSpec(folder=self.folder, label=self.label, precisions=self.precisions,
                         fields=(*self.fields, (name, value)))


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
        paths: runtime run paths to run (``plain``, ``iobinding``, ``cudagraph`` on CUDA; default all the runtime
            offers on each device).
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
        tf32: on CUDA, let fp32 matrix products use TF32 tensor cores, in the runtime (``use_tf32``) and in
            PyTorch (``torch.backends.cuda.matmul.allow_tf32``) alike; off by default, the report says which.
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
    tf32: bool = False
    plot: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model folder to benchmark")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        for name in ("corpus_size", "warmup"):
            check_positive_int(name, getattr(self, name), minimum=0)
        for name in ("corpus_batch_size", "min_calls", "max_calls", "rounds", "corpus_rounds", "corpus_slices"):
            check_positive_int(name, getattr(self, name))
        if self.max_calls < self.min_calls:
            raise ValueError(f"max_calls ({self.max_calls}) must be >= min_calls ({self.min_calls})")
        check_positive_int("threads", self.threads, optional=True)
        if self.paths is not None:
            unknown = set(self.paths) - set(RUN_PATHS)
            if unknown:
                raise ValueError(f"unknown run path(s) {sorted(unknown)}; choose from {', '.join(RUN_PATHS)}")
        if not self.shapes and not self.corpus_size:
            raise ValueError("nothing to run: give at least one shape or a corpus size > 0")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """The CI mode: two small shapes, a 200-text corpus, few calls; seconds on a tiny model."""
        settings: dict[str, Any] = {"shapes": QUICK_GRID, "corpus_size": 200, "warmup": 1, "min_time_s": 0.2,
                                    "min_calls": 3, "max_calls": 10, "rounds": 2, "corpus_slices": 4}
        settings.update(overrides)
        return cls(**settings)
