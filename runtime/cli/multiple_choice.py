"""``deberta-onnx multiple-choice``: each input line is a prompt and its choices, tab-separated; prints the choices'
scores and the best one per line, as JSON."""

from __future__ import annotations

import argparse
from typing import Any

from ..multiple_choice import MultipleChoice
from .common import add_load_flags, check_output, json_line, load, read_lines, write_text

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    choose = commands.add_parser(
        "multiple-choice", help="pick the best of several answers with a multiple-choice model (JSON lines out)",
        description="Run an exported multiple-choice model (a DebertaV2ForMultipleChoice checkpoint) over a file "
                    "whose lines are PROMPT<TAB>CHOICE<TAB>CHOICE...; prints per line {prompt, choices, scores, "
                    "best, answer}: the softmax over the choices, in their order, and the best one.",
    )
    choose.add_argument("model_dir", help="a folder exported from a ...ForMultipleChoice checkpoint")
    choose.add_argument("--input", required=True, help="text file, PROMPT<TAB>CHOICE<TAB>CHOICE... per line; - for "
                                                       "stdin")
    choose.add_argument("--output", default=None, help="write the JSON lines here instead of stdout")
    choose.add_argument("--batch-size", type=int, default=None,
                        help="questions per model call (default: as many as fit 32 (prompt, choice) rows)")
    add_load_flags(choose)
    choose.set_defaults(run=run)


def _question(line: str, number: int) -> tuple[str, list[str]]:
    prompt, *choices = line.split("\t")
    if not choices:
        raise ValueError(f"line {number} has no tab; each line is PROMPT<TAB>CHOICE<TAB>CHOICE...")
    return prompt, choices


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output(args.output)
    questions = [_question(line, number) for number, line in enumerate(read_lines(args.input), 1)]
    results = load(args, MultipleChoice).predict(questions, batch_size=args.batch_size)
    write_text((json_line(result._asdict()) for result in results), args.output)
    return 0
