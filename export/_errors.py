"""Named errors of the export stage."""

from __future__ import annotations

from deberta_onnx.runtime.errors import DebertaOnnxError

__all__ = [
    "CheckpointError",
    "ExportError",
    "OutputExistsError",
    "QualityGateError",
    "UnsupportedHeadError",
    "UnsupportedModelError",
    "ValidationError",
]


class ExportError(DebertaOnnxError):
    """The export could not produce a valid model folder. Nothing was written to OUT_DIR."""


class CheckpointError(ExportError):
    """The source checkpoint could not be found or loaded."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is not a DeBERTa architecture this exporter supports."""


class UnsupportedHeadError(UnsupportedModelError):
    """The checkpoint's head (its config's ``architectures``) has no graph in this exporter; ``task="embedding"``
    exports its encoder alone."""


class OutputExistsError(ExportError, FileExistsError):
    """OUT_DIR exists and is not empty, and overwriting was not asked for."""


class ValidationError(ExportError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance.

    Attributes:
        report: the full validation report (one row per shape), worst case first in ``report["worst"]``.
    """

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class QualityGateError(ExportError):
    """A lower-precision variant's sentence vectors are too far from the fp32 PyTorch reference.

    Attributes:
        precision: the variant that failed (``"int8-static"``, ...).
        reports: the quality report of every recipe tried, in order; the last one names the worst sentence.
    """

    def __init__(self, message: str, precision: str, reports: list[dict]) -> None:
        super().__init__(message)
        self.precision = precision
        self.reports = reports
