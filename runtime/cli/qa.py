"""``deberta-onnx qa``: extractive question answering with an exported ``...ForQuestionAnswering`` model; one
question and context from the flags, or one JSON object ``{"question": ..., "context": ...}`` per input line, and
one JSON answer (or list of ``--top-k`` answers) out per question."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..question_answering import AnswerOptions, QuestionAnswerer
from .common import (
    add_load_flags,
    check_output,
    config_defaults,
    default_note,
    json_line,
    load,
    read_lines,
    write_text,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    defaults = config_defaults(AnswerOptions)
    qa = commands.add_parser(
        "qa", help="answer questions from a context with an exported question-answering model (JSON out)",
        description="Find each question's answer as a span of its context, as transformers' question-answering "
                    "pipeline does (windows over long contexts, span scores, character offsets): one question "
                    "with --question and --context, or a JSONL file of {\"question\": ..., \"context\": ...} "
                    "objects with --input. Prints one JSON object per question: "
                    '{"score": ..., "start": ..., "end": ..., "answer": ...} (a list of them with --top-k > 1).',
    )
    qa.add_argument("model_dir", help="a folder exported from a ...ForQuestionAnswering checkpoint")
    qa.add_argument("--question", default=None, help="the question (with --context)")
    qa.add_argument("--context", default=None, help="the text to find the answer in (with --question)")
    qa.add_argument("--input", default=None,
                    help='JSONL file, one {"question": ..., "context": ...} object per line; - for stdin')
    qa.add_argument("--top-k", type=int, default=defaults["top_k"],
                    help="answers per question, best first" + default_note(defaults, "top_k"))
    qa.add_argument("--max-answer-len", type=int, default=defaults["max_answer_len"],
                    help="longest answer in tokens" + default_note(defaults, "max_answer_len"))
    qa.add_argument("--max-seq-len", type=int, default=None,
                    help="tokens per window, question included (default 384, or the model's maximum if shorter)")
    qa.add_argument("--doc-stride", type=int, default=None,
                    help="tokens by which the windows of a long context overlap (default min(max-seq-len // 2, 128))")
    qa.add_argument("--handle-impossible-answer", action="store_true",
                    help="also consider the null answer (SQuAD2's no answer): "
                         '{"score": ..., "start": 0, "end": 0, "answer": ""}')
    qa.add_argument("--no-align-to-words", dest="align_to_words", action="store_false",
                    help="keep the tokens' own offsets instead of widening answers to whole words")
    qa.add_argument("--output", default=None, help="write the JSON lines here instead of stdout")
    qa.add_argument("--batch-size", type=int, default=None,
                    help="windows per model call (default 32; with --max-tokens, a cap on rows)")
    add_load_flags(qa)
    qa.set_defaults(run=run)


def _pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (question, context) pairs of the flags, or of the JSONL input."""
    given = args.question is not None or args.context is not None
    if given == (args.input is not None) or (given and (args.question is None or args.context is None)):
        raise ValueError("give --question and --context for one question, or --input with a JSONL file of "
                         '{"question": ..., "context": ...} objects (not both)')
    if given:
        return [(args.question, args.context)]
    pairs = []
    for number, line in enumerate(read_lines(args.input), 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} is not JSON ({exc.msg}); each line is one "
                             '{"question": ..., "context": ...} object') from exc
        if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("question", "context")):
            raise ValueError(f'line {number} must be a JSON object with "question" and "context" strings')
        pairs.append((item["question"], item["context"]))
    return pairs


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output(args.output)  # a path that cannot take the file fails now, not after the work
    pairs = _pairs(args)
    answerer = load(args, QuestionAnswerer)
    results = answerer.answer([q for q, _ in pairs], [c for _, c in pairs], top_k=args.top_k,
                              max_answer_len=args.max_answer_len, max_seq_len=args.max_seq_len,
                              doc_stride=args.doc_stride, handle_impossible_answer=args.handle_impossible_answer,
                              align_to_words=args.align_to_words, batch_size=args.batch_size)
    write_text((json_line(result) for result in results), args.output)
    return 0
