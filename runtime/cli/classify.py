"""``deberta-onnx classify``: labels for texts or text pairs (sequence classifiers), labelled spans (token
classifiers), or, with ``--candidate-labels``, zero-shot labels through an NLI model; one JSON object per input
line."""

from __future__ import annotations

import argparse
from typing import Any

from ..classifier import SequenceClassifier, TokenClassifier
from ..contract import (
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
)
from ..errors import TaskMismatchError
from ..manifest import load_manifest
from ..postprocess import AGGREGATIONS
from ..zero_shot import DEFAULT_HYPOTHESIS_TEMPLATE, ZeroShotClassifier
from .common import (
    add_load_flags,
    add_progress_flags,
    check_output,
    json_line,
    load,
    read_lines,
    show_progress,
    write_text,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    classify = commands.add_parser(
        "classify", help="label texts or text pairs with an exported classifier (JSON lines out)",
        description="Run a sequence classifier (one label per text, or per TEXT<TAB>TEXT_PAIR line with --pairs: "
                    "NLI, rerankers) or a token classifier (labelled spans, e.g. NER) over a file of lines; "
                    "prints one JSON object per line. With --candidate-labels, an NLI model classifies each line "
                    "zero-shot, as transformers' zero-shot-classification pipeline: "
                    '{"sequence": ..., "labels": [best first], "scores": [...]}.',
    )
    classify.add_argument("model_dir", help="a folder exported from a ...ForSequenceClassification or "
                                            "...ForTokenClassification checkpoint")
    classify.add_argument("--input", required=True, help="text file, one input per line; - for stdin")
    classify.add_argument("--pairs", action="store_true", help="each line is TEXT<TAB>TEXT_PAIR (sequence classifiers)")
    classify.add_argument("--aggregation", default="first", choices=list(AGGREGATIONS),
                          help="how token labels become spans (token classifiers; default first)")
    classify.add_argument("--candidate-labels", default=None, metavar="LABELS",
                          help="zero-shot classification with an NLI model: the labels to choose from, "
                               "comma-separated (e.g. 'sports,politics,science')")
    classify.add_argument("--hypothesis-template", default=DEFAULT_HYPOTHESIS_TEMPLATE,
                          help=f"zero-shot: the hypothesis each label is put into at its {{}} (default "
                               f"{DEFAULT_HYPOTHESIS_TEMPLATE!r})".replace("%", "%%"))
    classify.add_argument("--multi-label", action="store_true",
                          help="zero-shot: score each label on its own (several may be true)")
    classify.add_argument("--output", default=None, help="write the JSON lines here instead of stdout")
    classify.add_argument("--batch-size", type=int, default=None,
                          help="inputs per model call (default 32; with --max-tokens, a cap on rows)")
    add_progress_flags(classify)
    add_load_flags(classify)
    classify.set_defaults(run=run)


def _pair(line: str, number: int) -> tuple[str, str]:
    if "\t" not in line:
        raise ValueError(f"line {number} has no tab; with --pairs each line is TEXT<TAB>TEXT_PAIR")
    first, second = line.split("\t", 1)
    return first, second


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output(args.output)  # a path that cannot take the file fails now, not after the work
    task = load_manifest(args.model_dir).task
    zero_shot = args.candidate_labels is not None
    if not zero_shot and (args.multi_label or args.hypothesis_template != DEFAULT_HYPOTHESIS_TEMPLATE):
        raise ValueError("--multi-label and --hypothesis-template apply to zero-shot classification; give "
                         "--candidate-labels too")
    if zero_shot and (args.pairs or task != TASK_SEQUENCE_CLASSIFICATION):
        raise ValueError("--candidate-labels classifies single texts with an NLI sequence classifier; "
                         f"{'drop --pairs' if args.pairs else f'{args.model_dir} holds a {task} model'}")
    lines = read_lines(args.input)
    rows: list[dict[str, Any]]
    if zero_shot:
        results = load(args, ZeroShotClassifier).predict(
            lines, args.candidate_labels, hypothesis_template=args.hypothesis_template,
            multi_label=args.multi_label, batch_size=args.batch_size, show_progress=show_progress(args))
        rows = [result._asdict() for result in results]
    elif task == TASK_SEQUENCE_CLASSIFICATION:
        classifier = load(args, SequenceClassifier)
        inputs = [_pair(line, n) for n, line in enumerate(lines, 1)] if args.pairs else lines
        scores = classifier.probabilities(inputs, batch_size=args.batch_size, show_progress=show_progress(args))
        labels = classifier.labels
        rows = [{"label": labels[int(row.argmax())], "score": float(row.max()),
                 "scores": {label: float(value) for label, value in zip(labels, row)}} for row in scores]
    elif task == TASK_TOKEN_CLASSIFICATION:
        if args.pairs:
            raise ValueError("--pairs is for sequence classifiers; a token classifier labels single texts")
        tagger = load(args, TokenClassifier)
        spans = tagger.predict(lines, batch_size=args.batch_size, aggregation=args.aggregation,
                              show_progress=show_progress(args))
        rows = [{"text": text, "spans": [span._asdict() for span in found]} for text, found in zip(lines, spans)]
    elif task in (TASK_MULTIPLE_CHOICE, TASK_FILL_MASK):
        raise TaskMismatchError(f"{args.model_dir} holds a {task} model; use `deberta-onnx {task}` with it")
    elif task == TASK_QUESTION_ANSWERING:
        raise TaskMismatchError(f"{args.model_dir} holds a question-answering model; use `deberta-onnx qa` with it")
    else:
        raise TaskMismatchError(f"{args.model_dir} holds an embedding model; use `deberta-onnx embed` or "
                                "`deberta-onnx search` with it")
    write_text((json_line(row) for row in rows), args.output)
    return 0
