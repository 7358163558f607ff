"""Silencing the libraries the export drives, for the duration of a step: the export prints its own progress and
reports, and theirs (weight-loading bars, "consider pre-processing", ...) is noise. A caller's logging stays
theirs: no level of the root logger is changed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort

from deberta_onnx.runtime.loggers import quiet_loggers

__all__ = ["quiet_libraries", "quiet_quantization"]

# The torch exporter's loggers; transformers' own is "transformers".
_TORCH_EXPORT_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")
# ONNX Runtime's tools that log through named loggers: the fp16 converter (onnxruntime.transformers.float16) and
# a few quantization modules (shape inference, the CUDA and n-bit quantizers).
_ORT_TOOL_LOGGERS = ("onnxruntime.quantization", "onnxruntime.transformers")
# ONNX Runtime's package folders whose modules log with module-level ``logging.warning(...)`` calls, that is,
# through the root logger itself ("Please consider to run pre-processing before quantization", per-tensor notes).
_ORT_TOOL_FOLDERS = ("quantization", "transformers")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silences transformers' and torch.onnx's progress bars and warnings for the duration; restores them after.

    The export prints its own progress; theirs (weight loading bars, "torchvision is not installed") is noise.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet_loggers("transformers", *_TORCH_EXPORT_LOGGERS):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class _FromFolders(logging.Filter):
    """Drops the records below ``level`` that were logged from a source file under one of ``folders``."""

    def __init__(self, folders: tuple[str, ...], level: int) -> None:
        super().__init__()
        self._folders = folders
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self._level or not record.pathname.startswith(self._folders)


@contextmanager
def quiet_quantization() -> Iterator[None]:
    """Silences the advice of ONNX Runtime's quantization and fp16 tools (below ERROR) for the duration.

    Most of the quantization tool's messages are module-level ``logging.warning(...)`` calls, which log through
    the root logger. A filter on the root logger drops those records by the file that made them, so the
    caller's own records, root logger included, get through; the tools' named loggers are raised to ERROR.
    """
    package = Path(ort.__file__).parent
    folders = tuple(os.path.join(str(package / name), "") for name in _ORT_TOOL_FOLDERS)
    gate = _FromFolders(folders, logging.ERROR)
    root = logging.getLogger()
    root.addFilter(gate)
    try:
        with quiet_loggers(*_ORT_TOOL_LOGGERS):
            yield
    finally:
        root.removeFilter(gate)
