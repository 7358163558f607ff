"""Export a Hugging Face DeBERTa checkpoint to one ONNX graph with fused pooling (needs the ``export`` extra).

    from deberta_onnx.export import export_model
    export_model("microsoft/deberta-v3-base", "out/deberta-v3-base")

The names here are the exporter's API. ``deberta_onnx.export.precision`` holds the lower precisions' steps and
``deberta_onnx.export.testing`` what tests and benchmarks build exports from (random checkpoints, outliers).
"""

from __future__ import annotations

from deberta_onnx.runtime.installed import require_extra

require_extra(
    "export",
    "deberta_onnx.export",
    note="Install torch's CPU build before it, `pip install torch==2.13.0` (or keep any torch you already have), "
         "so that the extra does not pull a CUDA build. The runtime (deberta_onnx.runtime) works without them.",
)

from ._errors import (  # noqa: E402
    CheckpointError,
    ExportError,
    OutputExistsError,
    QualityGateError,
    UnsupportedModelError,
    ValidationError,
)
from ._export import export_model  # noqa: E402
from ._validate import DEFAULT_VALIDATION_SHAPES  # noqa: E402
from .config import ExportConfig, ExportResult  # noqa: E402
from .precision import RECIPES, Recipe  # noqa: E402

__all__ = [
    "DEFAULT_VALIDATION_SHAPES",
    "RECIPES",
    "CheckpointError",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "OutputExistsError",
    "QualityGateError",
    "Recipe",
    "UnsupportedModelError",
    "ValidationError",
    "export_model",
]
