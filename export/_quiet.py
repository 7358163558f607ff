"""Silencing the libraries the export drives, for the duration of a step: the export prints its own reports, and
their advice ("consider pre-processing", ...) is noise. A caller's logging stays theirs: no level of the root
logger is changed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort

from deberta_onnx.runtime.utils import quiet_loggers

__all__ = ["quiet_quantization"]

# ONNX Runtime's tools that log through named loggers: the fp16 converter (onnxruntime.transformers.float16) and
# a few quantization modules (shape inference, the CUDA and n-bit quantizers).
_ORT_TOOL_LOGGERS = ("onnxruntime.quantization", "onnxruntime.transformers")
# ONNX Runtime's package folders whose modules log with module-level ``logging.warning(...)`` calls, that is,
# through the root logger itself ("Please consider to run pre-processing before quantization", per-tensor notes).
_ORT_TOOL_FOLDERS = ("quantization", "transformers")


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
