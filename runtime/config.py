"""``EncoderConfig``: how a model folder is loaded and run. Standard library only; the CLI's load flags read
their defaults from it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checks import check_positive_int
from .contract import PRECISIONS

__all__ = [
    "ARENA_CHOICES",
    "AUTO",
    "AUTO_FULL_WIDTH",
    "BF16",
    "CUDA_ARENA_STRATEGIES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CPU_MAX_TOKENS",
    "DEFAULT_SHRINK_TOKENS",
    "ENGINES",
    "ENGINE_ONNXRUNTIME",
    "ENGINE_OPENVINO",
    "MAX_THREADS_PER_CORE",
    "RUNTIME_PRECISIONS",
    "EncoderConfig",
    "check_thread_count",
    "max_threads",
    "parse_device",
]

# Rows per model call when neither a batch size nor a token budget is given.
DEFAULT_BATCH_SIZE = 32
# Sequence bucket with IO binding: few enough widths (32 up to 512 tokens) that buffers are reused, at most 15
# padding tokens a row.
DEFAULT_IO_BINDING_BUCKET = 16
# ``max_tokens="auto"``: this budget on the CPU, none on CUDA.
AUTO = "auto"
# The CPU token budget per model call (rows x padded length) when none is given: 8 texts of 512 tokens. Measured
# on the deberta-v3-base shape (benchmarks/README.md, "Long texts"): no slower per text than larger calls, and
# the activations of one call stay a fraction of the weights' memory.
DEFAULT_CPU_MAX_TOKENS = 4096
# Past this width the automatic budget also caps a call's attention scores (rows x width^2) at what a full call
# of this width holds: the tokens alone would let 2 texts of 2048 tokens run together, 4x a 512 call's scores.
AUTO_FULL_WIDTH = 512
# After a model call of at least this many padded tokens, ONNX Runtime's CPU arena returns its unused memory.
DEFAULT_SHRINK_TOKENS = 2048
# ``cpu_arena``: how ONNX Runtime's CPU memory arena grows (or whether there is one).
ARENA_CHOICES = ("same-as-requested", "next-power-of-two", "off")
# The most threads a thread-count setting may ask for, per core of the machine (``os.cpu_count()``). ONNX Runtime
# starts every thread asked for, each with its own stack and scratch memory: past a few per core they only take
# turns on the same cores (1,000 threads took 53.6 s to embed 2 lines; 100,000 grew a process to 16 GB).
MAX_THREADS_PER_CORE = 4
# The CUDA provider's arena_extend_strategy values.
CUDA_ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
# The engines a CPU model runs on; ``auto`` picks one of the first two by measurement (``deberta_onnx.runtime.tune``).
ENGINE_ONNXRUNTIME = "onnxruntime"
ENGINE_OPENVINO = "openvino"
ENGINES = (ENGINE_ONNXRUNTIME, ENGINE_OPENVINO, AUTO)
# bf16 is not a file of its own: the fp32 graph run by OpenVINO with bf16 as its inference precision (CPUs with
# AVX512-BF16 or AMX). The other precisions are the exported variants.
BF16 = "bf16"
RUNTIME_PRECISIONS = (*PRECISIONS, BF16)


def parse_device(device: str) -> tuple[str, int]:
    """Splits ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into (kind, device id).

    Raises:
        ValueError: any other string.
    """
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and (not index or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {device!r}")


def max_threads() -> int:
    """The most threads a thread-count setting may ask for on this machine: ``MAX_THREADS_PER_CORE`` per core."""
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)


def check_thread_count(name: str, value: object, *, optional: bool = True, minimum: int = 0) -> None:
    """Raises ``ValueError`` unless ``value`` is an int from ``minimum`` to ``max_threads()`` (or ``None`` if
    ``optional``): a thread count past a few per core only oversubscribes the cores and costs memory.

    Args:
        name: the setting, for the message (``"intra_op_threads"``, ``"--threads"``).
        value: the count asked for.
        optional: whether ``None`` (the library's default) is allowed.
        minimum: the smallest count allowed (0: ONNX Runtime's default).
    """
    check_positive_int(name, value, optional=optional, minimum=minimum)
    limit = max_threads()
    if isinstance(value, int) and value > limit:
        raise ValueError(
            f"{name} is {value}, more than this machine can use: at most {limit} ({MAX_THREADS_PER_CORE} per core, "
            f"{os.cpu_count() or 1} cores). Threads past that only take turns on the same cores and each costs "
            "memory; leave it unset for one per core, or run more processes to use more machines."
        )


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """How an ``Encoder`` (or a classifier) loads and runs its model. The CLI's load flags map onto these fields.

    Attributes:
        precision: which exported variant to load (``"fp32"``, ``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``),
            or ``"bf16"``: the fp32 graph computed in bfloat16 by OpenVINO (``engine="openvino"`` or ``"auto"``, on
            a CPU with AVX512-BF16 or AMX); ``None`` picks the best one the folder holds for the first provider
            (see ``deberta_onnx.runtime.loader.PREFERRED_PRECISIONS``).
        engine: what runs the graph on the CPU: ``"onnxruntime"`` (default), ``"openvino"`` (needs the
            ``openvino`` extra; CPU only, no IO binding), or ``"auto"``: whichever of the two a short measurement
            on this machine found faster for this folder and precision (``deberta-onnx tune``; measured at the
            first load and cached per machine, folder and versions when not tuned before; ONNX Runtime when
            OpenVINO is not installed). Tokenization, batching and post-processing are the same on both.
        engine_cache_dir: where OpenVINO keeps compiled models, so that a second load does not compile again:
            ``"auto"`` (default) a folder in the user's cache directory, a path, or ``None`` for no cache. Not
            used by ONNX Runtime.
        intra_op_threads: ONNX Runtime threads inside one operator (OpenVINO's ``INFERENCE_NUM_THREADS``);
            ``None`` uses one per physical core (OpenVINO: its own default). At most ``MAX_THREADS_PER_CORE`` (4)
            per core of the machine.
        inter_op_threads: threads across operators; ``None`` keeps ONNX Runtime's default. The same bound.
        allow_spinning: let idle ONNX Runtime threads spin (lower latency, busier cores); ``None`` keeps the default.
        verify_checksums: check every file's sha256 against the manifest at load (costs about 1 s per GB).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; short for a provider list (CUDA, then CPU for the few
            host-side nodes). ``None``: the ``providers`` argument decides, else the CPU.
        io_binding: run through IO binding, with device buffers reused per (batch, sequence) shape; ``None``:
            on with CUDA, off on the CPU. Embedding models only: classifiers and ``encode_tokens`` run
            through ``session.run``.
        sequence_bucket: pad each batch's length up to a multiple of this many tokens, so that few shapes
            occur; ``None``: 16 with IO binding, 1 (no extra padding) without.
        max_tokens: a token budget per batch (rows x padded length): a batch holds as many texts as fit it,
            and a ``batch_size`` given to ``encode`` caps the rows as well. ``"auto"`` (default):
            ``DEFAULT_CPU_MAX_TOKENS`` (4096) on the CPU, with ``batch_size`` still 32 when not given, and past
            512 tokens no more attention scores per call than 8 texts of 512 hold (2 texts of 1024 tokens a
            call, 1 past 1024); no budget on CUDA. ``None``: no budget, rows are ``batch_size``.
        max_buckets: most (batch, sequence) shapes whose IO-binding buffers are kept (least recently used
            freed first); with CUDA graphs, also the most graphs captured.
        cuda_graph: capture one CUDA graph per shape and replay it (needs CUDA and IO binding); a short batch's
            rows are then padded to the next power of two (at most the batch size), so that few shapes occur.
        cpu_arena: how ONNX Runtime's CPU memory arena grows: ``"same-as-requested"`` (default: by what a
            call needs, in one arena shared by the sessions of the process), ``"next-power-of-two"`` (ONNX
            Runtime's own default: each session's arena doubles its last growth, so up to twice what a call
            needs stays reserved), or ``"off"`` (no arena: every tensor is allocated and freed per call).
        arena_shrink_tokens: after a model call of at least this many padded tokens (rows x width), the CPU
            arena hands the memory no tensor uses back to the system (ONNX Runtime's
            ``memory.enable_memory_arena_shrinkage``, then glibc's ``malloc_trim`` for what the C heap keeps),
            so a burst of long texts does not keep its peak; smaller calls keep theirs for reuse. ``None``:
            never.
        max_call_memory_mb: the most memory one model call may take, as estimated from its attention score
            tensors (``batching.call_memory``): batches hold fewer rows where more would pass it, and a folder
            whose longest input (``max_sequence_length``) alone would pass it is refused at load with
            ``MemoryLimitError``. ``None``: no limit.
        cuda_arena_extend_strategy: how the CUDA provider's memory arena grows, ``"kNextPowerOfTwo"`` or
            ``"kSameAsRequested"``; ``None``: ``kSameAsRequested`` with CUDA graphs (as ONNX Runtime's own
            CUDA-graph helper), else ONNX Runtime's default (``kNextPowerOfTwo``).
        gpu_mem_limit: most bytes the CUDA provider's arena may hold; ``None``: no limit.
        use_tf32: let the CUDA provider run fp32 matrix products on TF32 tensor cores (faster, about three
            decimal digits). Off by default, for parity with PyTorch's fp32 (which does not use TF32 for matrix
            products by default).
    """

    precision: str | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    verify_checksums: bool = True
    device: str | None = None
    io_binding: bool | None = None
    sequence_bucket: int | None = None
    max_tokens: int | str | None = AUTO
    max_buckets: int = 64
    cuda_graph: bool = False
    cpu_arena: str = "same-as-requested"
    arena_shrink_tokens: int | None = DEFAULT_SHRINK_TOKENS
    max_call_memory_mb: int | None = 8192
    cuda_arena_extend_strategy: str | None = None
    gpu_mem_limit: int | None = None
    use_tf32: bool = False
    engine: str = ENGINE_ONNXRUNTIME
    engine_cache_dir: str | None = AUTO

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in RUNTIME_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(RUNTIME_PRECISIONS)} or None, "
                             f"got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.precision == BF16 and self.engine == ENGINE_ONNXRUNTIME:
            raise ValueError("precision 'bf16' runs the fp32 graph on OpenVINO (ONNX Runtime's CPU provider has no "
                             "bf16 kernels for it); pass engine='openvino' or engine='auto' (CLI: --engine openvino)")
        if self.engine != ENGINE_ONNXRUNTIME:
            if self.device is not None and parse_device(self.device)[0] != "cpu":
                raise ValueError(f"engine {self.engine!r} runs on the CPU; device {self.device!r} needs "
                                 "engine='onnxruntime' (its CUDA provider)")
            if self.io_binding or self.cuda_graph:
                raise ValueError(f"io_binding and cuda_graph are ONNX Runtime features; leave them off with "
                                 f"engine {self.engine!r}")
        if self.engine_cache_dir is not None and not isinstance(self.engine_cache_dir, str):
            raise ValueError(f"engine_cache_dir must be 'auto', a folder path (str) or None, "
                             f"got {self.engine_cache_dir!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            check_thread_count(name, getattr(self, name))
        if self.max_tokens != AUTO:
            if isinstance(self.max_tokens, str):
                raise ValueError(f"max_tokens must be a positive int, 'auto' or None, got {self.max_tokens!r}")
            check_positive_int("max_tokens", self.max_tokens, optional=True)
        for name in ("sequence_bucket", "arena_shrink_tokens"):
            check_positive_int(name, getattr(self, name), optional=True)
        if self.cpu_arena not in ARENA_CHOICES:
            raise ValueError(f"cpu_arena must be one of {', '.join(ARENA_CHOICES)}, got {self.cpu_arena!r}")
        check_positive_int("max_buckets", self.max_buckets)
        check_positive_int("max_call_memory_mb", self.max_call_memory_mb, optional=True)
        if self.device is not None:
            parse_device(self.device)
        if self.cuda_graph and self.io_binding is False:
            raise ValueError("cuda_graph needs io_binding (a graph replays fixed device buffers); "
                             "drop io_binding=False")
        if self.cuda_arena_extend_strategy not in (None, *CUDA_ARENA_STRATEGIES):
            raise ValueError(f"cuda_arena_extend_strategy must be one of {', '.join(CUDA_ARENA_STRATEGIES)} or "
                             f"None, got {self.cuda_arena_extend_strategy!r}")
        check_positive_int("gpu_mem_limit", self.gpu_mem_limit, optional=True)
        if not isinstance(self.use_tf32, bool):
            raise ValueError(f"use_tf32 must be True or False, got {self.use_tf32!r}")
