"""``deberta-onnx embed``: a file of texts, one per line, -> a ``.npy`` of sentence vectors in input order."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..encoder import Encoder
from .common import add_load_flags, add_progress_flags, check_output, load, read_lines, save_npy, show_progress

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "embed", help="encode a file of texts (one per line) into a .npy of sentence vectors",
        description="Encode texts, one per line, into a [n, hidden] float32 .npy file, in input order.",
    )
    parser.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    parser.add_argument("--input", required=True, help="text file, one text per line; - for stdin")
    parser.add_argument("--output", required=True, help="where to write the .npy")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="texts per model call (default 32; with --max-tokens, a cap on rows)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    parser.add_argument("--no-truncate", action="store_true", help="fail on texts longer than the model's maximum")
    parser.add_argument("--dimensions", type=int, default=None,
                        help="Matryoshka truncation: keep the first N dimensions (renormalised when normalising)")
    add_progress_flags(parser)
    add_load_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output)  # a path that cannot take the file fails now, not after the work
    texts = read_lines(args.input)
    encoder = load(args, Encoder)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=args.normalize,
                             truncate=not args.no_truncate, show_progress=show_progress(args),
                             dimensions=args.dimensions)
    save_npy(vectors, args.output)
    print(f"{args.output}: {vectors.shape[0]} x {vectors.shape[1]} float32 (precision {encoder.precision}: "
          f"{encoder.precision_reason})", file=sys.stderr)
    return 0
