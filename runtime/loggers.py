"""Quieting the loggers of the libraries this package drives. Standard library only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_loggers"]


@contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raises the named loggers to ``level`` for the duration and restores them after.

    Libraries this package drives (transformers, torch.onnx, ONNX Runtime's tools) log advice that the export
    and benchmarks replace with their own report. The root logger is never touched: a caller's logging stays theirs.
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels):
            logger.setLevel(previous)
