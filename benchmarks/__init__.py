"""Benchmarks against the PyTorch reference (needs the ``export`` and ``bench`` extras).

    from deberta_onnx.benchmarks import BenchConfig, ModelSpec, run_benchmark
    run_benchmark(BenchConfig(models=(ModelSpec.parse("models/base"),), out_dir=Path("bench-out")))

or ``deberta-onnx bench models/base --out bench-out``. ``timing`` is the one timing helper every script here uses.
"""

from __future__ import annotations

from deberta_onnx.runtime.errors import MissingExtraError
from deberta_onnx.runtime.installed import DISTRIBUTION, missing_extra

# The PyTorch reference needs the export extra; the report needs the bench extra.
_EXTRAS = ("export", "bench")


def _check_imports() -> None:
    missing = {extra: missing_extra(extra) for extra in _EXTRAS}
    lacking = [extra for extra in _EXTRAS if missing[extra]]
    if lacking:
        names = sorted({name for extra in lacking for name in missing[extra]})
        raise MissingExtraError(
            f"the benchmarks need {', '.join(names)}, which the base install leaves out: they run the PyTorch "
            f"reference beside the runtime. Install `pip install torch==2.13.0` (a CPU build; or any torch you "
            f"already have) and then `pip install '{DISTRIBUTION}[{','.join(lacking)}]'`."
        )


_check_imports()

from .backends import ThreadSetting  # noqa: E402
from .config import BenchConfig, ModelSpec  # noqa: E402
from .run import run_benchmark  # noqa: E402
from .workloads import DEFAULT_GRID, QUICK_GRID, Shape, parse_shapes  # noqa: E402

__all__ = ["DEFAULT_GRID", "QUICK_GRID", "BenchConfig", "ModelSpec", "Shape", "ThreadSetting", "parse_shapes",
           "run_benchmark"]
