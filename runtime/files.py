"""Files in and out: atomic writes, durable folder entries, JSON caches, and input text split into one line per row.
Standard library only."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "fsync_dir", "read_json_cache", "text_lines", "write_json_cache"]


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


def read_json_cache(path: Path) -> dict[str, Any]:
    """The JSON object in a cache file; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_cache(path: Path, data: dict[str, Any]) -> None:
    """Writes ``data`` to a cache file, atomically (readers see the old file or the new one, never half of it).

    Raises:
        OSError: the folder cannot be created or written.
    """
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


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
