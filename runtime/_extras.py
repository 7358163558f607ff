"""Checking that an optional extra is installed, without importing it (torch alone takes seconds to import)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["missing_modules"]


def missing_modules(names: Iterable[str]) -> list[str]:
    """The top-level modules among ``names`` that cannot be imported here."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing
