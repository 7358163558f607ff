"""Checks for the optional parts of the package (``export``, ``server``, ``benchmarks``) before they import
their extras."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable


def missing_modules(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that cannot be imported here (not installed, or blocked)."""
    return [name for name in names if _missing(name)]


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True
