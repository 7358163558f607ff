"""``deberta-onnx search``: the corpus texts (or stored vectors) most similar to each query."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..encoder import Encoder
from ..similarity import SCORES, semantic_search
from .common import add_load_flags, add_progress_flags, json_line, load, read_lines, show_progress, shown

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    search = commands.add_parser(
        "search", help="find the corpus texts (or vectors) most similar to queries",
        description="Embed one or more queries and print the top-k most similar entries of a corpus: a text file "
                    "(one text per line, embedded now) or a .npy of vectors from `deberta-onnx embed` (searched in "
                    "chunks from disk, so it may be larger than memory; --corpus-texts gives the lines to print).",
    )
    search.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    search.add_argument("--corpus", required=True, help="text file (one text per line) or .npy of vectors")
    search.add_argument("--corpus-texts", default=None, help="for a .npy corpus: the text file it was embedded from")
    search.add_argument("--query", action="append", help="a query text (repeat for several)")
    search.add_argument("--queries", default=None, help="file of queries, one per line; - for stdin")
    search.add_argument("--top-k", type=int, default=5, help="results per query (default 5)")
    search.add_argument("--score", default="cosine", choices=list(SCORES), help="similarity (default cosine)")
    search.add_argument("--dimensions", type=int, default=None,
                        help="Matryoshka truncation of queries (and a text corpus) to the first N dimensions")
    search.add_argument("--batch-size", type=int, default=None,
                        help="texts per model call (default 32; with --max-tokens, a cap on rows)")
    search.add_argument("--json", action="store_true", help="one JSON object per query instead of a table")
    add_progress_flags(search)
    add_load_flags(search)
    search.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    queries = list(args.query or []) + (read_lines(args.queries) if args.queries else [])
    if not queries:
        raise ValueError("no query: give --query TEXT (repeatable) or --queries FILE (one per line, - for stdin)")
    encoder = load(args, Encoder)
    corpus_path = Path(args.corpus)
    if not corpus_path.is_file():
        raise ValueError(f"--corpus {args.corpus}: no such file (give a text file, one text per line, or a .npy "
                         "of vectors written by `deberta-onnx embed`)")
    texts: list[str] | None = None
    if corpus_path.suffix == ".npy":
        corpus = np.load(corpus_path, mmap_mode="r")  # searched in chunks: never loaded whole
        if args.corpus_texts:
            texts = read_lines(args.corpus_texts)
            if len(texts) != len(corpus):
                raise ValueError(f"--corpus-texts has {len(texts)} lines but {args.corpus} holds {len(corpus)} "
                                 "vectors; give the file the vectors were embedded from")
    else:
        texts = read_lines(args.corpus)
        corpus = encoder.encode(texts, batch_size=args.batch_size, show_progress=show_progress(args),
                                dimensions=args.dimensions)
    vectors = encoder.encode(queries, batch_size=args.batch_size, dimensions=args.dimensions)
    if corpus.ndim != 2 or corpus.shape[1] != vectors.shape[1]:
        raise ValueError(f"{args.corpus} holds vectors of shape {corpus.shape[1:]} but the queries have "
                         f"{vectors.shape[1]} dimensions; embed both with the same model (and --dimensions)")
    results = semantic_search(vectors, corpus, top_k=args.top_k, score=args.score)
    for query, hits in zip(queries, results):
        rows = [{"index": h.index, "score": h.score, **({"text": texts[h.index]} if texts else {})} for h in hits]
        if args.json:
            print(json_line({"query": query, "hits": rows}))
            continue
        print(f"query: {shown(query)}")
        for rank, row in enumerate(rows, 1):
            print(f"  {rank:>3}. {row['score']:.4f}  [{row['index']}]  {shown(str(row.get('text', '')))}".rstrip())
    return 0
