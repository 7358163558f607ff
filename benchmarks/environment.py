"""What a benchmark's report says about where it ran: versions, hardware, models, settings, load."""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from deberta_onnx.runtime.installed import installed_versions
from deberta_onnx.runtime.manifest import Manifest, load_manifest

from .backends import runtime_paths
from .config import BenchConfig, ModelSpec

__all__ = ["cpu_features", "describe_environment", "load_average"]

_VERSIONED = ("deberta-onnx", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tokenizers", "numpy")


class _Group(Protocol):
    source: str
    specs: list[ModelSpec]
    manifest: Manifest


def describe_environment(config: BenchConfig, groups: Sequence[_Group], device_list: list[str]) -> dict[str, Any]:
    """The report's ``environment`` section."""
    import onnxruntime as ort
    import psutil
    import torch

    versions = installed_versions(_VERSIONED)
    hardware: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_features": cpu_features(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }
    if "cuda" in device_list:
        hardware["gpu"] = torch.cuda.get_device_name(0)
    models = []
    for group in groups:
        source = group.manifest.source
        for spec in group.specs:
            manifest = load_manifest(spec.folder)
            models.append({"label": spec.label, "folder": str(spec.folder), "source": group.source,
                           "shape": source.shape, "random_weights": source.random_weights,
                           "variants": sorted(manifest.variants), "optimization": manifest.optimization})
    settings = {k: v for k, v in config.__dict__.items() if k not in ("models", "out_dir", "shapes", "ort_threads")}
    settings["shapes"] = [str(s) for s in config.shapes]
    settings["ort_threads"] = [str(t) for t in config.ort_threads] if config.ort_threads else None
    settings["torch_threads"] = torch.get_num_threads()
    settings["runtime_paths"] = sorted({path for device in device_list for path in runtime_paths(device)})
    # Which onnxruntime build ran: the CPU and the GPU package can both be importable, and only one is imported.
    build = {"version": ort.__version__, "file": ort.__file__, "device": ort.get_device(),
             "providers": ort.get_available_providers()}
    tf32 = None
    if "cuda" in device_list:
        tf32 = {"runtime_use_tf32": config.tf32, "torch_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["deberta-onnx", *sys.argv[1:]]) if sys.argv and "deberta-onnx" in sys.argv[0] else None,
        "versions": versions,
        "onnxruntime_providers": ort.get_available_providers(),
        "onnxruntime": build,
        "tf32": tf32,
        "hardware": hardware,
        "devices": device_list,
        "models": models,
        "random_weights": any(m["random_weights"] for m in models),
        "settings": settings,
    }


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# The vector instructions ONNX Runtime's and PyTorch's kernels choose between: int8 speed in particular depends on
# VNNI (without it, and without AMX, an x86 int8 product takes two instructions and can saturate).
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_int8",
                 "asimd", "asimddp", "sve", "i8mm")


def cpu_features() -> list[str]:
    """The CPU's vector extensions that matter to the kernels (from /proc/cpuinfo; empty where it is absent)."""
    flags = set((_cpuinfo_field("flags", "Features") or "").split())
    return [name for name in _CPU_FEATURES if name in flags]


def _cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of ``names`` (None where there is none)."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith(names)), None)


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    """/proc/cpuinfo's lines, read once (empty where it is absent)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpu_name() -> str:
    name = _cpuinfo_field("model name")
    if name:
        return name
    return platform.processor() or "unknown"
