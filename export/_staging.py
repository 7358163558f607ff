"""The export's filesystem transaction: the model folder is built in a staging folder beside OUT_DIR and
renamed into place only once complete, so a failed or killed export leaves no partial OUT_DIR; staging folders
left by killed exports are removed by the next export to the same place."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._errors import ExportError, OutputExistsError

__all__ = ["check_target", "staging_folder", "write_error"]

_PARTIAL = ".partial-"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuses an OUT_DIR that is a file, or a non-empty folder unless ``overwrite``."""
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is a file; choose a folder path for OUT_DIR.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{target} exists and is not empty; choose another OUT_DIR or pass --overwrite (overwrite=True) to "
            "replace it once the new export is complete."
        )


@contextmanager
def staging_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh folder beside ``target``; on success swaps it into place, on any failure removes it."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(parent, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL}{os.getpid()}-", dir=parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the finished folder gets the usual permissions
    except OSError as exc:
        raise write_error(exc, parent, target) from exc
    try:
        yield staging
        check_target(target, overwrite)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, ExportError):
            raise write_error(exc, staging, target) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_partials(parent: Path, name: str) -> None:
    """Deletes staging folders left by exports that were killed (their process no longer runs)."""
    for path in parent.glob(f".{name}{_PARTIAL}*"):
        pid_text = path.name[len(f".{name}{_PARTIAL}"):].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_error(exc: OSError, where: Path, target: Path) -> ExportError:
    """An ``ExportError`` naming the path that could not be written and why, in words."""
    path = exc.filename or where
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied",
               errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
               errno.EPERM: "operation not permitted"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return ExportError(f"cannot write {path}: {reason}. Nothing was written to {target}; free space or fix "
                       "permissions, then export again.")
