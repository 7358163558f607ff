"""``deberta-onnx fill-mask``: the best tokens for each [MASK] of each input line, as transformers' fill-mask pipeline
gives them; one JSON value per line."""

from __future__ import annotations

import argparse
from typing import Any

from ..fill_mask import DEFAULT_TOP_K, FillMask
from .common import add_load_flags, check_output, json_line, load, read_lines, write_text

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    fill = commands.add_parser(
        "fill-mask", help="fill the [MASK] tokens of texts with a masked LM (JSON lines out)",
        description="Run an exported masked LM (a DebertaForMaskedLM / DebertaV2ForMaskedLM checkpoint, "
                    "--task fill-mask) over a file of lines, each with one or more [MASK] tokens; prints per line "
                    "what transformers' fill-mask pipeline returns: a list of {score, token, token_str, sequence} "
                    "best first, or one such list per mask for a line with several.",
    )
    fill.add_argument("model_dir", help="a folder exported with --task fill-mask")
    fill.add_argument("--input", required=True, help="text file, one text with [MASK] per line; - for stdin")
    fill.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                      help=f"candidates per mask (default {DEFAULT_TOP_K})")
    fill.add_argument("--targets", default=None, metavar="TOKENS",
                      help="score only these comma-separated words or tokens (as the pipeline's targets=)")
    fill.add_argument("--output", default=None, help="write the JSON lines here instead of stdout")
    fill.add_argument("--batch-size", type=int, default=None, help="texts per model call (default 32)")
    add_load_flags(fill)
    fill.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output(args.output)
    lines = read_lines(args.input)
    targets = None if args.targets is None else [t.strip() for t in args.targets.split(",") if t.strip()]
    model = load(args, FillMask)
    answers = [model.predict(line, top_k=args.top_k, targets=targets) for line in lines] if len(lines) < 2 else \
        model.predict(lines, top_k=args.top_k, targets=targets, batch_size=args.batch_size)
    write_text((json_line(answer) for answer in answers), args.output)
    return 0
