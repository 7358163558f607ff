"""ONNX Runtime sessions: execution providers (checked before and after the session is made), devices, and the
session options the runtime sets."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from .config import EncoderConfig, parse_device
from .errors import CudaGraphError, ModelFolderError, ModelLoadError, ProviderUnavailableError
from .installed import installed_versions

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "CudaSettings",
    "ProviderList",
    "SessionSettings",
    "create_session",
    "cuda_available",
    "gpu_install_hint",
    "installed_onnxruntime",
    "load_error",
    "parse_device",
    "provider_names",
    "resolve_providers",
    "session_device",
    "shrink_run_options",
]

ProviderList = Sequence[str | tuple[str, dict[str, object]]]

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# Providers whose tensors live in CUDA device memory, so that IO binding binds buffers there.
_CUDA_MEMORY_PROVIDERS = (CUDA_PROVIDER, "TensorrtExecutionProvider")
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
# How InferenceSession::Initialize words its refusal of enable_cuda_graph (inference_session.cc): a Memcpy node, a
# node on another provider, or a control-flow node. Older releases say "the CUDA Graph feature", newer ones "the
# graph capture feature".
_CUDA_GRAPH_REFUSAL = re.compile(r"cannot use the (?:CUDA Graph|graph capture) feature", re.IGNORECASE)

_GPU_RECIPE = (
    "Install ONNX Runtime's GPU build in place of the CPU one: `pip install 'deberta-onnx[gpu]' && "
    "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu` (the base "
    "install pulls in the CPU package `onnxruntime`; it and `onnxruntime-gpu` write the same `onnxruntime` "
    "folder, so the two must not be installed at once, and the reinstall restores the files the uninstall "
    "removed)."
)


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """What the runtime passes to ``onnxruntime.SessionOptions``; ``None`` leaves ONNX Runtime's default."""

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    # "same-as-requested" (the process's shared CPU arena, grown by what is asked), "next-power-of-two" (each
    # session's own arena, ONNX Runtime's default), "off" (no CPU arena); None leaves ONNX Runtime's default.
    cpu_arena: str | None = None


@dataclass(frozen=True, kw_only=True)
class CudaSettings:
    """The CUDA provider options the runtime sets, from ``EncoderConfig``.

    Attributes:
        arena_extend_strategy: ``"kNextPowerOfTwo"`` or ``"kSameAsRequested"``; ``None``: ``kSameAsRequested``
            with CUDA graphs (what ONNX Runtime's own CUDA-graph helper, ``CudaSession``, passes), else ONNX
            Runtime's default.
        gpu_mem_limit: most bytes the CUDA provider's arena may hold; ``None``: no limit.
        use_tf32: let fp32 matrix products use TF32 tensor cores (about three decimal digits); off matches
            PyTorch's fp32 default.
        cuda_graph: ``enable_cuda_graph``.
    """

    arena_extend_strategy: str | None = None
    gpu_mem_limit: int | None = None
    use_tf32: bool = False
    cuda_graph: bool = False

    @classmethod
    def from_config(cls, config: EncoderConfig) -> CudaSettings:
        """The CUDA provider options an ``EncoderConfig`` asks for."""
        return cls(arena_extend_strategy=config.cuda_arena_extend_strategy, gpu_mem_limit=config.gpu_mem_limit,
                   use_tf32=config.use_tf32, cuda_graph=config.cuda_graph)

    def provider_options(self) -> dict[str, object]:
        """The options as ONNX Runtime's CUDA provider takes them (strings)."""
        options: dict[str, object] = {"use_tf32": "1" if self.use_tf32 else "0"}
        strategy = self.arena_extend_strategy or ("kSameAsRequested" if self.cuda_graph else None)
        if strategy is not None:
            options["arena_extend_strategy"] = strategy
        if self.gpu_mem_limit is not None:
            options["gpu_mem_limit"] = str(self.gpu_mem_limit)
        if self.cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider (not whether a device works)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def provider_names(providers: ProviderList) -> list[str]:
    """The providers' names, without their options."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def installed_onnxruntime() -> dict[str, str]:
    """The onnxruntime distributions installed in this environment, name -> version.

    ``onnxruntime`` and ``onnxruntime-gpu`` both install the one ``onnxruntime`` import package; with both,
    whichever was installed last decides which build ``import onnxruntime`` gets.
    """
    found = installed_versions(_ORT_DISTRIBUTIONS)
    del found["python"]
    return found


def gpu_install_hint() -> str:
    """How to get the CUDA provider, saying so when both onnxruntime packages are installed at once."""
    found = installed_onnxruntime()
    if len(found) == len(_ORT_DISTRIBUTIONS):
        both = " and ".join(f"{name} {version}" for name, version in found.items())
        return (
            f"Both {both} are installed: they overwrite each other's files in the one `onnxruntime` "
            f"package, and the import got the {'GPU' if cuda_available() else 'CPU'} build. {_GPU_RECIPE}"
        )
    return _GPU_RECIPE


def resolve_providers(
    providers: ProviderList | None, device: str | None, *, cuda_graph: bool = False, cuda: CudaSettings | None = None
) -> list[str | tuple[str, dict[str, object]]]:
    """The provider list a session is made with, from either an explicit list or a device name.

    ``device="cuda:N"`` means the CUDA provider on GPU N, then the CPU provider for the few nodes that ONNX
    Runtime keeps on the host. The CUDA provider, wherever it is in the list, gets ``cuda``'s options (options
    given with it in ``providers`` win over them); ``cuda_graph`` turns on its ``enable_cuda_graph`` option.

    Raises:
        ValueError: both ``providers`` and ``device`` given, an empty list, or ``cuda_graph`` without the CUDA
            provider first.
    """
    if providers is not None and device is not None:
        raise ValueError(
            f"pass either providers ({provider_names(providers)}) or device ({device!r}), not both; "
            "device='cuda' is short for providers=['CUDAExecutionProvider', 'CPUExecutionProvider']"
        )
    if providers is None:
        kind, index = parse_device(device or "cpu")
        chosen: list[str | tuple[str, dict[str, object]]] = (
            [(CUDA_PROVIDER, {"device_id": str(index)}), CPU_PROVIDER] if kind == "cuda" else [CPU_PROVIDER]
        )
    else:
        chosen = list(providers)
        if not chosen:
            raise ValueError("providers is empty; pass at least one ONNX Runtime execution provider, or None")
    settings = cuda or CudaSettings()
    if cuda_graph or settings.cuda_graph:
        first = chosen[0]
        name = first if isinstance(first, str) else first[0]
        if name != CUDA_PROVIDER:
            raise ValueError(
                f"cuda_graph needs {CUDA_PROVIDER} as the first provider (got {name}); use device='cuda' or "
                "leave cuda_graph off"
            )
        settings = CudaSettings(arena_extend_strategy=settings.arena_extend_strategy,
                                gpu_mem_limit=settings.gpu_mem_limit, use_tf32=settings.use_tf32, cuda_graph=True)
    for position, entry in enumerate(chosen):
        name, given = (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))
        if name == CUDA_PROVIDER:
            graph = {"enable_cuda_graph": "1"} if settings.cuda_graph else {}
            chosen[position] = (name, {**settings.provider_options(), **given, **graph})
    return chosen


def session_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where the session's preferred provider keeps tensors: ``("cuda", N)`` or ``("cpu", 0)``."""
    active = session.get_providers()[0]
    if active in _CUDA_MEMORY_PROVIDERS:
        options = session.get_provider_options().get(active, {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


def check_providers_available(providers: ProviderList) -> None:
    """Raises ``ProviderUnavailableError`` before a session is made if a requested provider is not installed."""
    available = ort.get_available_providers()
    for name in provider_names(providers):
        if name not in available:
            hint = gpu_install_hint() if name in _CUDA_MEMORY_PROVIDERS else ""
            raise ProviderUnavailableError(
                f"execution provider {name} is not available in this onnxruntime "
                f"({ort.__version__}, available: {', '.join(available)}). {hint}".strip()
            )


def create_session(path: Path, providers: ProviderList, settings: SessionSettings) -> ort.InferenceSession:
    """Makes an ``InferenceSession`` and checks afterwards that every requested provider is active.

    ONNX Runtime falls back to the CPU provider when, say, the CUDA libraries fail to load; that must not
    pass silently.

    Raises:
        ProviderUnavailableError: a requested provider is not installed, or ONNX Runtime left it out.
        CudaGraphError: CUDA graphs were requested and ONNX Runtime refused them for this graph.
        ModelLoadError: ONNX Runtime could not load the file (truncated, corrupted, not ONNX, out of memory).
    """
    check_providers_available(providers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.intra_op_threads is not None:
        options.intra_op_num_threads = settings.intra_op_threads
    if settings.inter_op_threads is not None:
        options.inter_op_num_threads = settings.inter_op_threads
    if settings.allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    if settings.cpu_arena == "off":
        options.enable_cpu_mem_arena = False
    elif settings.cpu_arena == "same-as-requested" and _shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own pybind classes, not RuntimeError subclasses
        raise load_error(path, exc, cuda_graph=_wants_cuda_graph(providers)) from exc
    active = session.get_providers()
    missing = [name for name in provider_names(providers) if name not in active]
    if missing:
        hint = gpu_install_hint() if any(name in _CUDA_MEMORY_PROVIDERS for name in missing) else ""
        raise ProviderUnavailableError(
            f"ONNX Runtime created the session without {', '.join(missing)} (active: {', '.join(active)}); it "
            "fell back, usually because the CUDA or cuDNN libraries it needs could not be loaded (its log above "
            "names the library; `python -c \"import onnxruntime as o; o.preload_dlls(); "
            f"print(o.get_available_providers())\"` checks the setup). {hint}".strip()
        )
    return session


# ONNX Runtime's arena extend strategies (OrtArenaCfg): kNextPowerOfTwo 0, kSameAsRequested 1.
_SAME_AS_REQUESTED = 1


@functools.cache
def _shared_cpu_arena() -> bool:
    """Registers, once per process, a CPU arena that grows by what is requested rather than doubling, for the
    sessions made with ``session.use_env_allocators``.

    ONNX Runtime's Python API configures the CPU arena only this way (the CPU provider takes no arena options),
    so every session that asks for it shares this one arena: memory one model frees, another can reuse.

    Raises:
        ModelLoadError: ONNX Runtime refused the arena.
    """
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": _SAME_AS_REQUESTED}))
    except Exception as exc:  # onnxruntime raises its own pybind classes, not RuntimeError subclasses
        raise ModelLoadError(
            f"ONNX Runtime {ort.__version__} refused the shared CPU arena ({exc}); load with "
            "EncoderConfig(cpu_arena='next-power-of-two') to keep each session's own arena."
        ) from exc
    return True


def shrink_run_options(base: ort.RunOptions | None = None) -> ort.RunOptions:
    """Run options (``base``'s, or new ones) with which a run ends by handing the CPU arena's unused memory back
    to the system (``memory.enable_memory_arena_shrinkage``)."""
    options = base if base is not None else ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:300] + "..."


def load_error(path: Path, exc: BaseException, *, cuda_graph: bool) -> ModelFolderError | CudaGraphError:
    """The named error for an exception ONNX Runtime raised while making a session for ``path``: its refusal of
    CUDA graphs (only when they were asked for) is a ``CudaGraphError``, anything else a ``ModelLoadError``."""
    if cuda_graph and _CUDA_GRAPH_REFUSAL.search(str(exc)):
        return CudaGraphError(
            f"ONNX Runtime refused CUDA graphs for {path}: {exc}. A CUDA graph needs every compute node on the CUDA "
            "provider and no host-device copy (Memcpy) between them; folders exported by an older deberta-onnx "
            "copied a shape scalar in the relative-position code: re-export them. Or run without cuda_graph (IO "
            "binding still keeps the work on the GPU)."
        )
    return ModelLoadError(
        f"ONNX Runtime {ort.__version__} could not load {path}: {_first_line(exc)}. Either the file is truncated, "
        "corrupted or not an ONNX graph (load without --no-verify, i.e. verify_checksums=True, to check every file "
        "against the manifest, or re-export the folder), or ONNX Runtime ran out of memory or lacks an operator "
        "(its reason says which)."
    )


def _wants_cuda_graph(providers: ProviderList) -> bool:
    return any(not isinstance(p, str) and p[0] == CUDA_PROVIDER
               and str(p[1].get("enable_cuda_graph", "0")) in ("1", "true", "True") for p in providers)
