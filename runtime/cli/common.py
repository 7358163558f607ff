"""What the commands share: the load flags (``EncoderConfig``'s fields), reading input lines, writing outputs,
progress bars, and flag defaults read from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..config import ARENA_CHOICES, AUTO, CUDA_ARENA_STRATEGIES, EncoderConfig
from ..contract import PRECISIONS
from ..files import atomic_write, text_lines

__all__ = [
    "add_load_flags",
    "add_progress_flags",
    "config_defaults",
    "default_note",
    "load",
    "read_lines",
    "save_npy",
    "show_progress",
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


def save_npy(array: np.ndarray, destination: str) -> None:
    """Writes a ``.npy`` atomically: a failed run never leaves a truncated file behind."""
    atomic_write(destination, lambda handle: np.save(handle, array))


def write_text(lines: Iterable[str], destination: str | None) -> None:
    """Writes lines to a file (atomically) or, for ``None``, to stdout."""
    if destination is None:
        for line in lines:
            sys.stdout.write(line + "\n")
        return
    text = "".join(line + "\n" for line in lines)
    atomic_write(destination, lambda handle: handle.write(text.encode("utf-8")))


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
            choices=list(PRECISIONS),
            help="which exported variant to load (default: the best in the folder for the provider: int8-static, "
                 "then int8-dynamic, then fp32 on CPU)")),
        "intra_op_threads": (("--threads",), dict(type=int, help="ONNX Runtime intra-op threads (default: cores)")),
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
    config = EncoderConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(EncoderConfig)})
    return kind(args.model_dir if model_dir is None else model_dir, config=config)


def _optional_int(text: str) -> int | None:
    """``N`` or ``none``, for flags whose field takes an int or ``None``."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _budget(text: str) -> int | str | None:
    """``--max-tokens``: ``N``, ``auto`` or ``none``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return _optional_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'auto' or 'none', got {text!r}") from None
