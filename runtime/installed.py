"""What is installed: the distributions an optional extra needs, whether they import, and their versions.
Standard library only."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterable
from importlib import metadata

from .errors import MissingExtraError

__all__ = ["DISTRIBUTION", "installed_versions", "missing_extra", "require_extra"]

DISTRIBUTION = "deberta-onnx"

# Distributions whose import name is not their name with dashes turned into underscores.
_IMPORT_NAMES = {"protobuf": "google.protobuf", "onnxruntime-gpu": "onnxruntime", "pyyaml": "yaml",
                 "llama-index-core": "llama_index.core"}
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _extra_requirements(extra: str) -> list[str]:
    """The distribution names ``pyproject.toml`` lists under ``extra``, read from the installed metadata."""
    try:
        lines = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []  # running from a source tree that was never installed: nothing to check against
    names = []
    for line in lines:
        requirement, _, marker = line.partition(";")
        if extra in _EXTRA_MARKER.findall(marker):
            match = _NAME.match(requirement)
            if match:
                names.append(match.group(1))
    return names


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the module is blocked in sys.modules
        return False


def missing_extra(extra: str) -> list[str]:
    """The distributions of the ``extra`` (``"export"``, ``"server"``, ...) that cannot be imported here.

    The list of what the extra holds comes from the package's own metadata, so ``pyproject.toml`` is the one
    place that names it.
    """
    return [name for name in _extra_requirements(extra)
            if not _importable(_IMPORT_NAMES.get(name.lower(), name.replace("-", "_").lower()))]


def require_extra(extra: str, package: str, *, note: str = "") -> None:
    """Raises ``MissingExtraError`` (an ``ImportError``) naming the extra to install if any of its distributions is
    missing.

    Args:
        extra: the optional-dependency group, e.g. ``"export"``.
        package: the subpackage that needs it, for the message (``"deberta_onnx.export"``).
        note: more advice to append (e.g. how to install torch's CPU build first).
    """
    missing = missing_extra(extra)
    if missing:
        raise MissingExtraError(
            f"{package} needs {', '.join(missing)}, which the base install leaves out. Install the {extra} "
            f"extra: `pip install '{DISTRIBUTION}[{extra}]'`.{' ' + note if note else ''}"
        )


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """Python's version and each installed distribution's, by name (missing ones left out)."""
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
