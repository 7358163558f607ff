"""What the commands share: the load flags (``EncoderConfig``'s fields), reading input lines, writing outputs,
progress bars, and flag defaults read from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from ..config import (
    ARENA_CHOICES,
    AUTO,
    CUDA_ARENA_STRATEGIES,
    ENGINES,
    RUNTIME_PRECISIONS,
    EncoderConfig,
    check_thread_count,
)
from ..files import atomic_write, text_lines

__all__ = [
    "add_load_flags",
    "add_progress_flags",
    "check_output",
    "config_defaults",
    "default_note",
    "json_line",
    "load",
    "load_config",
    "read_lines",
    "save_npy",
    "show_progress",
    "shown",
    "write_text",
]

M = TypeVar("M")


def config_defaults(cls: Any) -> dict[str, Any]:
    """``{field: default}`` of a config dataclass: the one place a flag's default comes from."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def default_note(defaults: dict[str, Any], name: str, shown: str | None = None) -> str:
    """`` (default X)`` for a help text, or nothing when the default is not known here."""
    if name not in defaults:
        return ""
    return f" (default {shown if shown is not None else defaults[name]})"


def read_lines(source: str) -> list[str]:
    """The lines of a UTF-8 text file (or stdin for ``-``), one text per ``\\n``-terminated line.

    A trailing ``\\r`` is stripped (Windows line ends); no other character splits a line (see
    ``files.text_lines``), so that output row N belongs to input line N. Read as bytes, so that stdin's
    newline translation cannot split a lone ``\\r`` either.

    Raises:
        ValueError: the file does not exist, or is not UTF-8 (the message names the line).
    """
    if source == "-":
        if sys.stdin is None:  # the process was started with its stdin closed
            raise ValueError("cannot read texts from stdin (-): it is closed; pipe the texts in, or give a file")
        data = sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: no such file (give a text file with one text per line, or - for stdin)")
        data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{'stdin' if source == '-' else source} is not UTF-8 text: {exc.reason} at byte {exc.start} "
                         f"(line {line}); convert it to UTF-8 first (e.g. with iconv)") from exc
    return text_lines(text)


def check_output(destination: str, flag: str = "--output") -> tuple[Path, bool]:
    """Checks an output path before any work, and returns where to write and whether to stream there.

    A regular file (or a new one) is written beside its place and renamed over it, keeping an existing file's
    permission bits; a symlink is written through (its target is replaced so, the link stays). A FIFO, a
    character device and an open descriptor's name (``/dev/stdout``, ``/dev/null``, a shell's ``>(...)``) are
    opened and written in place, as a shell's ``>`` does: a rename would put a regular file in their place.

    Raises:
        ValueError: the path is a folder, a block device or a socket, an existing file that is read-only, or in a
            folder that cannot be written; the message says which.
    """
    path = Path(destination)
    try:
        info: os.stat_result | None = path.stat()  # follows symlinks: what a write would reach
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise ValueError(f"{flag} {destination}: {exc.strerror}; give a file path you can write") from exc
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{flag} {destination} is a folder; give a file path (e.g. {path / 'out'}{path.suffix})")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode)):
            raise ValueError(f"{flag} {destination} is a {_kind(info.st_mode)}, not a file; give a file path")
        if not stat.S_ISREG(info.st_mode) or _names_a_descriptor(path):
            if not os.access(path, os.W_OK):
                raise ValueError(f"{flag} {destination}: permission denied")
            return path, True
    target = Path(os.path.realpath(path))  # through a symlink (a dangling one too) to the file it names
    if info is not None and not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {destination} is read-only; make it writable or give another path")
    folder = target.parent
    while not folder.exists():  # atomic_write creates the missing folders under the nearest one that exists
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {destination}: cannot create files in {folder} "
                         f"({'not a folder' if not folder.is_dir() else 'permission denied'})")
    return target, False


def _names_a_descriptor(path: Path) -> bool:
    """Whether ``path`` is, or links on to, an open file descriptor (``/dev/stdout`` -> ``/proc/self/fd/1``,
    ``/dev/fd/N``): a file a shell opened for this process, to write into rather than replace."""
    current = str(path.absolute())
    for _ in range(40):  # the kernel's own bound on a chain of symlinks
        if current.startswith(("/proc/", "/dev/fd/")):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.join(os.path.dirname(current), os.readlink(current))
    return False


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def write_output(destination: str, write: Callable[[IO[bytes]], object]) -> None:
    """Writes an output file as ``check_output`` says: atomically (keeping an existing file's mode) or, for FIFOs
    and devices, in place.

    Raises:
        ValueError: the path cannot take the file (see ``check_output``).
        OSError: the write failed; the message names the path.
    """
    target, stream = check_output(destination)
    try:
        if stream:
            buffer = io.BytesIO()  # built whole first: a pipe cannot seek, which numpy's writer may do
            write(buffer)
            with open(target, "wb") as handle:
                handle.write(buffer.getbuffer())
            return
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
        atomic_write(target, write, mode=mode)
    except OSError as exc:
        raise OSError(f"cannot write {destination}: {exc.strerror or exc}") from exc


def save_npy(array: np.ndarray, destination: str) -> None:
    """Writes a ``.npy`` (see ``write_output``): a failed run never leaves a truncated file behind."""
    write_output(destination, lambda handle: np.save(handle, array))


def write_text(lines: Iterable[str], destination: str | None) -> None:
    """Writes lines to a file (see ``write_output``) or, for ``None``, to stdout."""
    if destination is None:
        for line in lines:
            sys.stdout.write(line + "\n")
        return
    text = "".join(line + "\n" for line in lines)
    write_output(destination, lambda handle: handle.write(text.encode("utf-8")))


# Bidirectional controls, which reorder what a terminal shows after them ("Trojan Source"), besides the C0/C1
# controls (escape sequences, carriage returns) that unicodedata calls Cc.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def shown(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (ESC, CR, C1 codes, ...) and bidirectional
    controls written as escapes (``\\x1b``, ``\\u202e``), so that a text cannot move the cursor, recolour, retitle
    or reorder what the terminal shows; everything else as it is."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if ch in _BIDI_CONTROLS or (
        unicodedata.category(ch) == "Cc") else ch for ch in text)


# What JSON leaves unescaped that a terminal may still act on: DEL, the C1 controls, the bidirectional controls.
_UNESCAPED_BY_JSON = re.compile(f"[\x7f-\x9f{''.join(sorted(_BIDI_CONTROLS))}]")


def json_line(value: Any) -> str:
    """``value`` as one line of JSON (UTF-8 text kept as it is) in which every control character is escaped,
    so that printing it cannot drive a terminal."""
    text = json.dumps(value, ensure_ascii=False)
    return _UNESCAPED_BY_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                       help="show a progress bar (default: when stderr is a terminal)")
    group.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")


def show_progress(args: argparse.Namespace) -> bool:
    """--progress / --no-progress; by default a bar only when stderr is a terminal."""
    return bool(args.progress) if args.progress is not None else sys.stderr.isatty()


def _load_flags(defaults: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    """``{EncoderConfig field: (flag names, argparse options)}``, one row per field: the one table that both
    ``add_load_flags`` and ``load`` iterate. Each flag's value lands in ``args.<field>``; defaults are the
    dataclass's."""
    return {
        "precision": (("--precision",), dict(
            choices=list(RUNTIME_PRECISIONS),
            help="which exported variant to load (default: the best in the folder for the provider: int8-static, "
                 "then int8-dynamic, then fp32 on CPU); bf16: the fp32 graph computed in bfloat16 by OpenVINO "
                 "(--engine openvino or auto; CPUs with AVX512-BF16 or AMX)")),
        "intra_op_threads": (("--threads",), dict(
            type=_threads, help="ONNX Runtime intra-op threads (default: cores; at most 4 per core)")),
        "inter_op_threads": (("--inter-op-threads",), dict(
            type=int, help="ONNX Runtime threads across operators (default: ONNX Runtime's)")),
        "allow_spinning": (("--allow-spinning",), dict(
            action=argparse.BooleanOptionalAction,
            help="let idle ONNX Runtime threads spin: lower latency, busier cores (default: ONNX Runtime's)")),
        "verify_checksums": (("--no-verify",), dict(
            action="store_false", help="skip the sha256 check of the model files at load")),
        "device": (("--device",), dict(help="cpu, cuda or cuda:N (default: cpu)")),
        "io_binding": (("--io-binding",), dict(
            action=argparse.BooleanOptionalAction,
            help="reuse bound device buffers per batch shape (default: on with CUDA, off on the CPU)")),
        "sequence_bucket": (("--sequence-bucket",), dict(
            type=int, help="pad batch lengths to a multiple of N tokens (default: 16 with IO binding, else 1)")),
        "max_tokens": (("--max-tokens",), dict(
            type=_budget, metavar="N|auto|none",
            help="token budget per batch (rows x padded length): auto is 4096 on the CPU (rows still capped at the "
                 "batch size) and none on CUDA; none: a fixed batch size "
                 f"{default_note(defaults, 'max_tokens').strip()}")),
        "max_buckets": (("--max-buckets",), dict(
            type=int, help="most batch shapes whose IO-binding buffers (and CUDA graphs) are kept "
                           f"{default_note(defaults, 'max_buckets').strip()}")),
        "cuda_graph": (("--cuda-graph",), dict(
            action="store_true", help="capture and replay one CUDA graph per batch shape (CUDA, IO binding)")),
        "cpu_arena": (("--cpu-arena",), dict(
            choices=list(ARENA_CHOICES),
            help="how ONNX Runtime's CPU memory arena grows: by what a call needs, doubling (ONNX Runtime's "
                 f"default), or no arena {default_note(defaults, 'cpu_arena').strip()}")),
        "arena_shrink_tokens": (("--arena-shrink-tokens",), dict(
            type=_optional_int, metavar="N|none",
            help="after a model call of at least N padded tokens, hand the CPU arena's unused memory back to the "
                 f"system; none: never {default_note(defaults, 'arena_shrink_tokens').strip()}")),
        "max_call_memory_mb": (("--max-call-memory-mb",), dict(
            type=_optional_int, metavar="N|none",
            help="most memory one model call may take, estimated from its attention scores: batches hold fewer "
                 "rows past it, and a folder whose longest input alone passes it is refused at load; none: no "
                 f"limit {default_note(defaults, 'max_call_memory_mb').strip()}")),
        "cuda_arena_extend_strategy": (("--cuda-arena-extend-strategy",), dict(
            choices=list(CUDA_ARENA_STRATEGIES),
            help="how the CUDA provider's memory arena grows (default: kSameAsRequested with --cuda-graph, else "
                 "ONNX Runtime's kNextPowerOfTwo)")),
        "gpu_mem_limit": (("--gpu-mem-limit",), dict(
            type=int, help="most bytes the CUDA provider's arena may hold (default: no limit)")),
        "use_tf32": (("--tf32",), dict(
            action=argparse.BooleanOptionalAction,
            help="run fp32 matrix products on TF32 tensor cores on CUDA (default: off, as PyTorch fp32)")),
        "engine": (("--engine",), dict(
            choices=list(ENGINES),
            help="what runs the graph on the CPU: onnxruntime, openvino (the openvino extra), or auto: the faster "
                 "of the two on this machine, measured once and cached (deberta-onnx tune) "
                 f"{default_note(defaults, 'engine').strip()}")),
        "engine_cache_dir": (("--engine-cache-dir",), dict(
            type=_optional_path, metavar="DIR|auto|none",
            help="where OpenVINO caches compiled models, so that a second start does not compile again: auto (the "
                 f"user's cache directory), a folder, or none {default_note(defaults, 'engine_cache_dir').strip()}")),
    }


def add_load_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``EncoderConfig`` field (``_load_flags``), with its defaults.

    Raises:
        RuntimeError: ``EncoderConfig`` has a field the table has no flag for, or the table names one it lacks.
    """
    defaults = config_defaults(EncoderConfig)
    table = _load_flags(defaults)
    fields = [field.name for field in dataclasses.fields(EncoderConfig)]
    if sorted(table) != sorted(fields):
        raise RuntimeError(f"the CLI's load flags and EncoderConfig's fields differ: no flag for "
                           f"{sorted(set(fields) - set(table))}, no field for {sorted(set(table) - set(fields))}")
    for field in fields:
        names, options = table[field]
        parser.add_argument(*names, dest=field, default=defaults[field], **options)


def load(args: argparse.Namespace, kind: Callable[..., M], model_dir: str | None = None) -> M:
    """An ``Encoder`` or classifier (``kind``) loaded from ``model_dir`` (default ``args.model_dir``) as the load
    flags say."""
    return kind(args.model_dir if model_dir is None else model_dir, config=load_config(args))


def load_config(args: argparse.Namespace) -> EncoderConfig:
    """The ``EncoderConfig`` the load flags describe."""
    return EncoderConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(EncoderConfig)})


def _threads(text: str) -> int:
    """``--threads N``: an int from 0 (ONNX Runtime's default) to the machine's bound (``max_threads``)."""
    try:
        count = int(text)
        check_thread_count("--threads", count)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if "--threads" in str(exc) else
                                         f"expected a number of threads, got {text!r}") from None
    return count


def _optional_int(text: str) -> int | None:
    """``N`` or ``none``, for flags whose field takes an int or ``None``."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _optional_path(text: str) -> str | None:
    """``DIR``, ``auto`` or ``none``."""
    return None if text.strip().lower() == "none" else text


def _budget(text: str) -> int | str | None:
    """``--max-tokens``: ``N``, ``auto`` or ``none``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return _optional_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'auto' or 'none', got {text!r}") from None
