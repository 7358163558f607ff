"""``EncoderConfig``: how a model folder is loaded and run. Standard library only; the CLI's load flags read
their defaults from it."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_positive_int
from .contract import PRECISIONS

__all__ = [
    "ARENA_CHOICES",
    "AUTO",
    "AUTO_FULL_WIDTH",
    "CUDA_ARENA_STRATEGIES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CPU_MAX_TOKENS",
    "DEFAULT_SHRINK_TOKENS",
    "EncoderConfig",
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
# The CUDA provider's arena_extend_strategy values.
CUDA_ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")


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


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """How an ``Encoder`` (or a classifier) loads and runs its model. The CLI's load flags map onto these fields.

    Attributes:
        precision: which exported variant to load (``"fp32"``, ``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``);
            ``None`` picks the best one the folder holds for the first provider (see
            ``deberta_onnx.runtime.loader.PREFERRED_PRECISIONS``).
        intra_op_threads: ONNX Runtime threads inside one operator; ``None`` uses one per physical core.
        inter_op_threads: threads across operators; ``None`` keeps ONNX Runtime's default.
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

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None, got {self.precision!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            check_positive_int(name, getattr(self, name), optional=True, minimum=0)
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
