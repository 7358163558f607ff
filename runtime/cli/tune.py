"""``deberta-onnx tune``: measure which engine runs a model folder faster on this machine, and cache the choice
that ``--engine auto`` then reads."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import AUTO
from ..contract import TASKS
from ..loader import load_model
from .common import add_load_flags, load_config

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "tune", help="measure ONNX Runtime against OpenVINO on this machine, for --engine auto",
        description="Run the folder's graph on both engines (1 text x 32 tokens and 8 texts x 128 tokens, "
                    "interleaved, a few calls each) with the load flags given (precision, threads), and cache the "
                    "faster engine (or both, each for the calls it is measured faster on) for this CPU, graph, "
                    "precision, thread count and engine versions. A load with --engine auto reads it (and "
                    "measures by itself when nothing is cached); `deberta-onnx info` shows it.")
    parser.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    add_load_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = dataclasses.replace(load_config(args), engine=AUTO)
    loaded = load_model(args.model_dir, None, config, tasks=TASKS, user="deberta-onnx tune", remeasure=True)
    print(f"{loaded.model_dir} at precision {loaded.precision}: --engine auto runs {loaded.engine} "
          f"({loaded.engine_reason})")
    return 0
