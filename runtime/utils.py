"""Small helpers every part of the package shares: optional extras, atomic writes, quiet loggers, versions and
argument checks. Standard library only."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DISTRIBUTION",
    "MissingExtraError",
    "atomic_write",
    "check_positive_int",
    "fix_mmap_threshold",
    "fsync_dir",
    "installed_versions",
    "missing_extra",
    "quiet_loggers",
    "release_free_heap",
    "require_extra",
    "text_lines",
]

DISTRIBUTION = "deberta-onnx"

# Distributions whose import name is not their name with dashes turned into underscores.
_IMPORT_NAMES = {"protobuf": "google.protobuf", "onnxruntime-gpu": "onnxruntime", "pyyaml": "yaml",
                 "llama-index-core": "llama_index.core"}
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class MissingExtraError(ImportError):
    """An optional part of the package was used without its extra installed; the message names the pip command."""


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object], *, durable: bool = False,
                 mode: int | None = None) -> Path:
    """Writes a file through ``write(handle)`` beside ``path`` and renames it into place.

    A failed or interrupted write never leaves a truncated file at ``path``; the file gets the usual
    permissions (0666 less the umask), not the private 0600 of a temporary file, unless ``mode`` is given.

    Args:
        path: the file to write; its folder is created if needed.
        write: called with the open binary handle.
        durable: fsync the file and its folder, so that the rename survives a power cut.
        mode: the new file's permission bits (e.g. those of the file it replaces).

    Returns:
        ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def fsync_dir(folder: str | Path) -> None:
    """Flushes a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def text_lines(text: str) -> list[str]:
    """One text per ``\\n``-terminated line, a trailing ``\\r`` (Windows line ends) stripped.

    Unlike ``str.splitlines``, no other character ends a line: ``\\v``, ``\\f``, ``\\x1c``-``\\x1e``, U+0085,
    U+2028, U+2029 and a lone ``\\r`` stay inside their text, so that row N of an output is line N of the input.
    A final ``\\n`` ends the last line rather than starting an empty one; an empty string has no lines.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_positive_int(name: str, value: object, *, optional: bool = False, minimum: int = 1) -> None:
    """Raises ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum`` (or ``None`` if ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


def _glibc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """A function of glibc's malloc, or ``None`` where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return _glibc_function("malloc_trim", [ctypes.c_size_t])


# glibc's malloc.h; its environment variables of the same settings, which a user's choice arrives by.
_M_MMAP_THRESHOLD = -3
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold at ``size`` bytes for this process (``mallopt(M_MMAP_THRESHOLD)``), so that
    memory a burst of long inputs freed can be handed back; ``False`` where the C library cannot, or where the
    user set glibc's thresholds in the environment (theirs are kept).

    By default glibc raises the threshold to the size of each large block freed (up to 32 MB) and the trim
    threshold to twice that, after which such blocks come from the per-thread heaps instead of their own
    ``mmap``; what those heaps keep at their top, ``malloc_trim`` does not return. A fixed threshold keeps
    allocations of ``size`` or more in their own mappings, which go back to the system when freed.
    """
    if any(name in os.environ for name in _MALLOC_ENVIRONMENT):
        return False
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, size) == 1


def release_free_heap() -> bool:
    """Hands the C heap's free pages back to the system (glibc's ``malloc_trim(0)``); ``False`` where the C
    library cannot.

    Memory a program frees stays in glibc's heaps (one per thread that allocates) unless it sits at a heap's top
    or came from its own ``mmap``; after ONNX Runtime shrinks its arena, the freed buffers below the dynamic mmap
    threshold would otherwise keep the process's RSS up.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
