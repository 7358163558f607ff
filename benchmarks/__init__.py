"""Benchmarks against the PyTorch reference (``run_benchmark`` needs the ``export`` and ``bench`` extras; the
workloads, timing and environment modules need only the runtime, so that scripts run beside other libraries'
versions, as ``peers.py`` does).

    from deberta_onnx.benchmarks import BenchConfig, ModelSpec, run_benchmark
    run_benchmark(BenchConfig(models=(ModelSpec.parse("models/base"),), out_dir=Path("bench-out")))

or ``deberta-onnx bench models/base --out bench-out``. ``timing`` is the one timing helper every script here uses.
"""

from __future__ import annotations

from typing import Any

from deberta_onnx.runtime.errors import MissingExtraError
from deberta_onnx.runtime.installed import DISTRIBUTION, missing_extra

from .backends import ThreadSetting
from .config import BenchConfig, ModelSpec
from .workloads import DEFAULT_GRID, QUICK_GRID, Shape, parse_shapes

# The PyTorch reference needs the export extra; the report needs the bench extra.
_EXTRAS = ("export", "bench")


def check_extras() -> None:
    """Raises ``MissingExtraError`` naming what to install when the export or bench extra is missing (the PyTorch
    reference and the report need them)."""
    missing = {extra: missing_extra(extra) for extra in _EXTRAS}
    lacking = [extra for extra in _EXTRAS if missing[extra]]
    if lacking:
        names = sorted({name for extra in lacking for name in missing[extra]})
        raise MissingExtraError(
            f"the benchmarks need {', '.join(names)}, which the base install leaves out: they run the PyTorch "
            f"reference beside the runtime. Install `pip install torch==2.13.0` (a CPU build; or any torch you "
            f"already have) and then `pip install '{DISTRIBUTION}[{','.join(lacking)}]'`."
        )


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Runs ``config`` (see ``run.run_benchmark``); first checks that the export and bench extras are installed.

    Raises:
        MissingExtraError: torch, transformers or the report's packages are missing; the message says what to
            install.
    """
    check_extras()
    from .run import run_benchmark as run

    return run(config)


__all__ = ["DEFAULT_GRID", "QUICK_GRID", "BenchConfig", "ModelSpec", "Shape", "ThreadSetting", "check_extras",
           "parse_shapes", "run_benchmark"]
