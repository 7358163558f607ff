"""The export's filesystem transaction: the model folder is built in a staging folder beside OUT_DIR, flushed to
disk, and swapped into place only once complete, so a failed or killed export leaves no partial OUT_DIR and never
loses the one it replaces; what killed exports left behind is cleaned up (or put back) by the next export to the
same place.

Staging and retired folders are named ``.NAME.partial-PID@HOST-XXXX`` and ``.NAME.old-PID@HOST-XXXX``: the owner's
process id and host, so that an export on another host sharing the folder (NFS) is never taken for a dead one.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deberta_onnx.runtime.files import fsync_dir

from ._errors import ExportError, OutputExistsError

__all__ = ["check_target", "recover", "staging_folder", "write_error"]

_PARTIAL = ".partial-"
_OLD = ".old-"
# renameat2(2): swap two paths in one step (Linux 3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs, overlayfs).
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


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
    """Yields a fresh folder beside ``target``; on success flushes it to disk and swaps it into place, on any
    failure removes it (a failed swap leaves ``target`` as it was)."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _recover(parent, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL}{_owner()}-", dir=parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the finished folder gets the usual permissions
    except OSError as exc:
        raise write_error(exc, parent, target) from exc
    try:
        yield staging
        check_target(target, overwrite)
        _flush(staging)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, ExportError):
            raise write_error(exc, staging, target) from exc
        raise
    try:
        _swap(staging, target)
    except OSError as exc:
        raise ExportError(
            f"cannot move the new export into place at {target}: {_reason(exc)}. {target} was left as it was; the "
            f"new export is complete in {staging} (rename it to {target} yourself, or export again: the next "
            "export to this place removes it)."
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # interrupted (Ctrl-C, SIGTERM): the swap was undone
        raise


def _swap(staging: Path, target: Path) -> None:
    """Puts ``staging`` in place of ``target``: one atomic exchange where the filesystem has it, else two renames
    that are undone if the second fails or is interrupted. Either way ``target`` is only ever the old folder or
    the new one; a process killed between the two renames leaves the old one in ``.NAME.old-*``, which the next
    export puts back."""
    parent = target.parent
    if not target.exists():
        os.rename(staging, target)
        fsync_dir(parent)
        return
    if _exchange(staging, target):
        fsync_dir(parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    retired = parent / f".{target.name}{_OLD}{_owner()}-{os.urandom(4).hex()}"
    try:
        os.rename(target, retired)
        os.rename(staging, target)
    except BaseException:
        # The state is read from the disk, not from which call raised: a signal may land between the two.
        if retired.exists() and not os.path.lexists(target):
            os.rename(retired, target)
            fsync_dir(parent)
        raise
    fsync_dir(parent)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(staging: Path, target: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the filesystem
    cannot, so that the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(target))


def _flush(folder: Path) -> None:
    """fsyncs every file and folder under ``folder`` (and its parent), so that what the swap publishes is on disk:
    after a power cut OUT_DIR is the old folder or the complete new one, never one with empty files."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_dir(root)
    fsync_dir(folder.parent)


def recover(target: Path) -> None:
    """Cleans up after exports to ``target`` that were killed: puts back an OUT_DIR that one moved aside in its
    swap (when nothing replaced it), removes retired and staging folders whose owner is gone.

    Raises:
        ExportError: the parent folder cannot be read or written.
    """
    try:
        if target.parent.is_dir():
            _recover(target.parent, target.name)
    except OSError as exc:
        raise write_error(exc, target.parent, target) from exc


def _recover(parent: Path, name: str) -> None:
    target = parent / name
    for path in sorted(parent.glob(f"{glob.escape('.' + name + _OLD)}*")):
        if _owner_alive(path.name[len(f".{name}{_OLD}"):]):
            continue
        legacy = path / name  # the layout of earlier releases: .NAME.old-XXXX/NAME
        moved = legacy if legacy.is_dir() and not (path / "manifest.json").exists() else path
        if not os.path.lexists(target):
            os.rename(moved, target)
            if moved is legacy:
                shutil.rmtree(path, ignore_errors=True)
            fsync_dir(parent)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f"{glob.escape('.' + name + _PARTIAL)}*"):
        if not _owner_alive(path.name[len(f".{name}{_PARTIAL}"):]):
            shutil.rmtree(path, ignore_errors=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"


def _owner() -> str:
    return f"{os.getpid()}@{_host()}"


def _owner_alive(suffix: str) -> bool:
    """Whether the export that made a folder (``PID@HOST-XXXX``, or ``PID-XXXX`` from earlier releases) may still
    run: a process on another host cannot be checked, so it counts as alive."""
    owner = suffix.rsplit("-", 1)[0]
    pid_text, _, host = owner.partition("@")
    if not pid_text.isdigit():
        return False  # not a name this module makes (or an earlier release's .old-XXXX): nobody owns it
    if host and host != _host():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_REASONS = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
            errno.EDQUOT: "disk quota exceeded", errno.EPERM: "operation not permitted"}


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


def write_error(exc: OSError, where: Path, target: Path) -> ExportError:
    """An ``ExportError`` naming the path that could not be written and why, in words."""
    path = exc.filename or where
    return ExportError(f"cannot write {path}: {_reason(exc)}. Nothing was written to {target}; free space or fix "
                       "permissions, then export again.")
