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
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from deberta_onnx.runtime.contract import MANIFEST_FILE, MANIFEST_FORMAT
from deberta_onnx.runtime.files import fsync_dir

from ._errors import ExportError, OutputExistsError

__all__ = ["check_target", "foreign_entries", "recover", "staging_folder", "write_error"]

_PARTIAL = ".partial-"
_OLD = ".old-"
# renameat2(2): swap two paths in one step (Linux 3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs, overlayfs).
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def check_target(target: Path, overwrite: bool, source: str | None = None) -> None:
    """Refuses an OUT_DIR that is the source checkpoint or holds it, a file, a non-empty folder unless
    ``overwrite``, and, even with ``overwrite``, a folder that holds anything a previous export did not write:
    the swap replaces OUT_DIR as a whole, so only an export's own files may be in it.

    Args:
        target: OUT_DIR, absolute.
        overwrite: whether a previous export in OUT_DIR may be replaced.
        source: the checkpoint exported (a local folder, a hub id or ``random:SHAPE``).

    Raises:
        OutputExistsError: which of these it is, and what to do instead.
    """
    if source is not None and os.path.exists(source):
        held, out = os.path.realpath(source), os.path.realpath(target)
        if held == out or held.startswith(out.rstrip(os.sep) + os.sep):
            relation = "is the source checkpoint" if held == out else f"holds the source checkpoint {source}"
            raise OutputExistsError(
                f"OUT_DIR {target} {relation}; the export replaces OUT_DIR as a whole, which would delete the "
                f"checkpoint. Choose a new folder for OUT_DIR (e.g. {Path(held).name}-onnx beside it)."
            )
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is a file; choose a folder path for OUT_DIR.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"{target} exists and is not empty; choose another OUT_DIR or pass --overwrite (overwrite=True) to "
            "replace it once the new export is complete."
        )
    foreign = foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{target} holds {shown}, which no deberta-onnx export wrote there (--overwrite replaces only a "
            f"previous export: the files its {MANIFEST_FILE} lists). Nothing was changed; move those out of "
            f"{target} or choose another OUT_DIR."
        )


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` a deberta-onnx export did not write: every entry but its ``manifest.json`` and the files
    that lists (and the folders that hold them); everything, where the folder has no such manifest. Symlinks
    count as foreign: an export writes none."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict):
        return sorted(f"{p.name}{'/' if p.is_dir() else ''}" for p in folder.iterdir())
    listed = {*map(str, files), MANIFEST_FILE}
    holders = {str(parent) for name in listed for parent in PurePosixPath(name).parents} - {"."}
    foreign = []
    for root, dirs, names in os.walk(folder):
        base = Path(root).relative_to(folder).as_posix()
        for name in list(dirs):
            relative = name if base == "." else f"{base}/{name}"
            if os.path.islink(os.path.join(root, name)) or relative not in holders:
                foreign.append(relative + ("" if os.path.islink(os.path.join(root, name)) else "/"))
                dirs.remove(name)
        for name in names:
            relative = name if base == "." else f"{base}/{name}"
            if relative not in listed or os.path.islink(os.path.join(root, name)):
                foreign.append(relative)
    return sorted(foreign)


def _discard(folder: Path) -> bool:
    """Removes a previous export that was moved aside, unless something it did not write appeared in it since the
    check (then it is kept, and said): nothing the exporter did not write is ever deleted. Also takes the layout
    of earlier releases' retired folders, ``.NAME.old-XXXX/NAME``."""
    inner = list(folder.iterdir()) if folder.is_dir() and not (folder / MANIFEST_FILE).exists() else []
    if len(inner) == 1 and inner[0].is_dir() and not inner[0].is_symlink() and not foreign_entries(inner[0]):
        shutil.rmtree(folder, ignore_errors=True)
        return True
    if not folder.is_dir() or foreign_entries(folder):
        print(f"warning: kept {folder}: it holds files no deberta-onnx export wrote; move them out, then delete it.",
              file=sys.stderr, flush=True)
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@contextmanager
def staging_folder(target: Path, overwrite: bool, source: str | None = None) -> Iterator[Path]:
    """Yields a fresh folder beside ``target``; on success checks ``target`` again (``check_target``), flushes the
    new folder to disk and swaps it into place, on any failure removes it (a failed swap leaves ``target`` as it
    was)."""
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
        check_target(target, overwrite, source)
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
        _discard(staging)  # now the old folder
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
    _discard(retired)


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
            _discard(path)
    for path in parent.glob(f"{glob.escape('.' + name + _PARTIAL)}*"):
        if not _owner_alive(path.name[len(f".{name}{_PARTIAL}"):]):
            # A staging folder the exporter filled, or (killed after an exchange) the export it replaced.
            if (path / MANIFEST_FILE).exists():
                _discard(path)
            else:
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
