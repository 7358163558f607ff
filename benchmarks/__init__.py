"""Benchmarks against the PyTorch reference (needs the ``export`` and ``bench`` extras).

    from deberta_onnx.benchmarks import BenchConfig, ModelSpec, run_benchmark
    run_benchmark(BenchConfig(models=(ModelSpec.parse("models/base"),), out_dir=Path("bench-out")))

or ``deberta-onnx bench models/base --out bench-out``. ``timing`` is the one timing helper every script here uses.
"""

from __future__ import annotations

from deberta_onnx.runtime._extras import missing_modules

# The PyTorch reference needs the export extra; the report needs the bench extra.
_REQUIRED = {"torch": "export", "transformers": "export", "onnx": "export", "psutil": "bench", "matplotlib": "bench",
             "tqdm": "export"}


def _check_imports() -> None:
    missing = {name: _REQUIRED[name] for name in missing_modules(_REQUIRED)}
    if missing:
        extras = ",".join(sorted(set(missing.values())))
        raise ImportError(
            f"the benchmarks need {', '.join(missing)}, which the base install leaves out: they run the PyTorch "
            f"reference beside the runtime. Install `pip install torch==2.13.0` (a CPU build; or any torch you "
            f"already have) and then `pip install 'deberta-onnx[{extras}]'`."
        )


_check_imports()

from .backends import ThreadSetting  # noqa: E402
from .run import BenchConfig, ModelSpec, run_benchmark  # noqa: E402
from .workloads import DEFAULT_GRID, QUICK_GRID, Shape, parse_shapes  # noqa: E402

__all__ = ["DEFAULT_GRID", "QUICK_GRID", "BenchConfig", "ModelSpec", "Shape", "ThreadSetting", "parse_shapes",
           "run_benchmark"]
