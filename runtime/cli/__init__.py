"""The ``deberta-onnx`` command: one module per subcommand. Runtime subcommands need only the base install;
``export`` and ``bench`` need their extras, ``serve`` the server extra."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import DebertaOnnxError, MissingExtraError

__all__ = ["build_parser", "main"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. ``command`` names the subcommand about to run: only its flags' defaults are read from
    an optional extra's config (``export``, ``bench``), so that other commands start without importing torch."""
    # The subcommands import numpy, ONNX Runtime and tokenizers: here, not at this module's import, so that the
    # command's entry point imports nothing heavy before main's error handling runs (a Ctrl+C then is one line).
    from . import bench, classify, embed, export, fill_mask, info, multiple_choice, qa, search, serve, tune

    parser = argparse.ArgumentParser(
        prog="deberta-onnx",
        description="Export DeBERTa checkpoints to ONNX with fused pooling, and run them without PyTorch: "
                    "`export` writes a model folder (needs the export extra); `embed`, `search`, `classify`, `qa` and "
                    "`info` use it with the base install, `serve` with the server extra, `bench` (against "
                    "PyTorch) with the export and bench extras.",
        epilog="Run `deberta-onnx COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export.add_parser(commands, with_defaults=command == "export")
    embed.add_parser(commands)
    bench.add_parser(commands, with_defaults=command == "bench")
    serve.add_parser(commands)
    info.add_parser(commands)
    search.add_parser(commands)
    classify.add_parser(commands)
    qa.add_parser(commands)
    tune.add_parser(commands)
    multiple_choice.add_parser(commands)
    fill_mask.add_parser(commands)
    return parser


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so that cleanup (e.g. of a half-built export folder) runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deberta-onnx``; returns the process exit code. Called in a process's main thread, it turns
    SIGTERM into an orderly exit while it runs, and gives the caller's SIGTERM handler back when it returns."""
    previous: Any = None
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        command = next((word for word in words if not word.startswith("-")), None)
        # Inside the try: `export` and `bench` read their defaults from their extras (importing torch takes
        # seconds), and a Ctrl+C then is an interruption like any other.
        args = build_parser(command).parse_args(words)
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminate)
        return int(args.run(args))
    except MissingExtraError as exc:  # an optional part without its extra: the message names the pip command
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (DebertaOnnxError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
