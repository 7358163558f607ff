"""The ``deberta-onnx`` command. Runtime subcommands need only the base install; ``export`` needs the extra."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._server_config import ServerConfig
from .classifier import AGGREGATIONS
from .contract import POOLINGS, TASKS
from .contract import PRECISIONS
from .errors import DebertaOnnxError
from .similarity import SCORES

__all__ = ["main"]


def _export(args: argparse.Namespace) -> int:
    try:
        from deberta_onnx.export import export_model
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    result = export_model(args.src, args.out_dir, _export_config(args))
    print(result.out_dir)
    return 0


def _export_config(args: argparse.Namespace) -> Any:
    """The ``ExportConfig`` that ``deberta-onnx export``'s flags stand for (needs the export extra)."""
    from deberta_onnx.export import ExportConfig

    return ExportConfig(
        overwrite=args.overwrite,
        pooling=args.pooling,
        normalize=args.normalize,
        token_embeddings=args.token_embeddings,
        task=args.task,
        max_length=args.max_length,
        validate=not args.no_validate,
        atol=args.atol,
        tokenizer=args.tokenizer,
        optimize=not args.no_optimize,
        triton=args.triton,
        triton_name=args.triton_name,
        triton_max_batch_size=args.triton_max_batch_size,
        triton_max_queue_delay_us=args.triton_max_queue_delay_us,
        quiet=args.quiet,
        precisions=_precision_list(args.precision),
        calibration=args.calibration,
        min_cosine_fp16=args.min_cosine_fp16,
        min_cosine_int8=args.min_cosine_int8,
        fallback=args.fallback,
    )


def _precision_list(values: list[str] | None) -> tuple[str, ...]:
    """``--precision fp16,int8-static --precision int8-dynamic`` -> ("fp16", "int8-static", "int8-dynamic")."""
    names = [name.strip() for value in values or ["fp32"] for name in value.split(",") if name.strip()]
    return tuple(dict.fromkeys(names))


def _bench(args: argparse.Namespace) -> int:
    try:
        from deberta_onnx.benchmarks import BenchConfig, ModelSpec, ThreadSetting, parse_shapes, run_benchmark
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    fields = {
        "models": tuple(ModelSpec.parse(text) for text in args.models),
        "out_dir": Path(args.out),
        "reference": args.reference,
        "device": args.device,
        "precisions": tuple(args.precisions.split(",")) if args.precisions else None,
        "paths": tuple(args.paths.split(",")) if args.paths else None,
        "threads": args.threads,
        "ort_threads": tuple(ThreadSetting.parse(t) for t in args.ort_threads.split(",")) if args.ort_threads else None,
        "plot": not args.no_plot,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    # Flags left unset keep the mode's defaults (full or --quick).
    optional = {"shapes": parse_shapes(args.shapes) if args.shapes is not None else None, "corpus_size": args.corpus_size,
                "corpus_batch_size": args.corpus_batch_size, "warmup": args.warmup, "min_time_s": args.min_time,
                "min_calls": args.min_calls, "max_calls": args.max_calls, "rounds": args.rounds,
                "corpus_rounds": args.corpus_rounds, "corpus_slices": args.corpus_slices}
    fields.update({name: value for name, value in optional.items() if value is not None})
    config = BenchConfig.quick(**fields) if args.quick else BenchConfig(**fields)
    run_benchmark(config)
    print(Path(args.out) / "results.md")
    return 0


def _read_lines(source: str) -> list[str]:
    if source == "-":
        return sys.stdin.read().splitlines()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--input {source}: no such file (give a text file with one text per line, or - for stdin)")
    return path.read_text(encoding="utf-8").splitlines()


def _save_npy(array: np.ndarray, destination: str) -> None:
    """Writes next to the destination and renames, so a failed run never leaves a truncated .npy behind."""
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npy", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, array)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encoder_from_args(args: argparse.Namespace, kind: type | None = None) -> Any:
    """An ``Encoder`` (or ``kind``, another class of the runtime) loaded as the load flags say."""
    from .encoder import Encoder, EncoderConfig

    config = EncoderConfig(
        precision=args.precision,
        intra_op_threads=args.threads,
        verify_checksums=not args.no_verify,
        device=args.device,
        io_binding=args.io_binding,
        sequence_bucket=args.sequence_bucket,
        max_tokens=args.max_tokens,
        max_buckets=args.max_buckets,
        cuda_graph=args.cuda_graph,
    )
    return (kind or Encoder)(args.model_dir, config=config)


def _show_progress(args: argparse.Namespace) -> bool:
    """--progress / --no-progress; by default a bar only when stderr is a terminal."""
    return bool(args.progress) if args.progress is not None else sys.stderr.isatty()


def _embed(args: argparse.Namespace) -> int:
    texts = _read_lines(args.input)
    encoder = _encoder_from_args(args)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=args.normalize,
                             truncate=not args.no_truncate, show_progress=_show_progress(args),
                             dimensions=args.dimensions)
    _save_npy(vectors, args.output)
    print(f"{args.output}: {vectors.shape[0]} x {vectors.shape[1]} float32 (precision {encoder.precision}: "
          f"{encoder.precision_reason})", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        max_inputs=args.max_inputs,
        timeout_s=args.timeout_s,
        normalize=args.normalize,
        model_name=args.model_name,
        access_log=args.access_log,
    )
    encoder = _encoder_from_args(args)
    if threading.current_thread() is threading.main_thread():
        # uvicorn catches SIGTERM itself, shuts down gracefully, then raises it again; with the default
        # disposition the process then ends as stopped by SIGTERM, which service managers count as clean.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    serve(encoder, config)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .manifest import load_manifest

    manifest = load_manifest(args.model_dir)
    data = manifest.data
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    source = data.get("source", {})
    weights = "RANDOM weights (for parity and speed only)" if source.get("random_weights") else "trained weights"
    print(f"model:      {source.get('model')} ({source.get('architecture')}, {weights})")
    print(f"hidden:     {manifest.hidden_size}   max length: {manifest.max_sequence_length} tokens   "
          f"pooling: {manifest.pooling}")
    _print_task(manifest)
    for name, variant in manifest.variants.items():
        size = data["files"].get(variant["file"], {}).get("bytes", 0)
        report = variant.get("validation") or {}
        worst = report.get("worst", {}).get("max_abs_diff")
        quality = variant.get("quality") or {}
        if quality and "threshold" in quality:
            check = f"cosine to PyTorch >= {quality['min_cosine']:.5f} (gate {quality['threshold']:g})"
        else:
            check = f"max|diff| {worst:.1e} vs PyTorch" if worst is not None else "not validated"
        print(f"variant:    {name:<14} {variant['file']:<24} {size / 1e6:8.1f} MB   {check}")
    optimization = data.get("optimization") or {}
    if optimization.get("enabled"):
        fused = ", ".join(f"{k} {v}" for k, v in sorted(optimization.get("fused_operators", {}).items()))
        print(f"speed-ups:  optimised ({optimization.get('relative_attention_layers_folded', 0)} attention layers "
              f"folded{'; fused ' + fused if fused else ''})")
    else:
        print("speed-ups:  none, attention as transformers writes it (exported with --no-optimize)" if optimization
              else "speed-ups:  not recorded (exported before graph optimisation)")
    print(f"exported:   {data.get('created_at')} with {', '.join(f'{k} {v}' for k, v in data.get('versions', {}).items())}")
    return 0


def _print_task(manifest: Any) -> None:
    """The task lines of ``info``: what the graph computes and which class runs it."""
    from .contract import TASK_EMBEDDING

    outputs = ", ".join(f"{spec.name} {list(spec.dims)}" for spec in manifest.outputs)
    inputs = ", ".join(spec.name for spec in manifest.inputs)
    if manifest.task == TASK_EMBEDDING:
        print(f"task:       embedding (Encoder)   normalized in the graph: {'yes' if manifest.normalize else 'no'}")
    else:
        runner = "SequenceClassifier, CrossEncoder" if "sequence" in manifest.task else "TokenClassifier"
        print(f"task:       {manifest.task} ({runner})   labels: {', '.join(manifest.labels)}")
    print(f"graph:      inputs {inputs}; outputs {outputs}")
    st = manifest.data.get("source", {}).get("sentence_transformers")
    if st:
        print(f"sentence-transformers modules: {' -> '.join(st['modules'])}")
    triton = manifest.data.get("triton")
    if triton:
        print(f"triton:     {triton['repository']}/{triton['model_name']}/ (max batch {triton['max_batch_size']})")


# --- search and classify -----------------------------------------------------------------------------------


def _search(args: argparse.Namespace) -> int:
    from .similarity import semantic_search

    queries = list(args.query or []) + (_read_lines(args.queries) if args.queries else [])
    if not queries:
        raise ValueError("no query: give --query TEXT (repeatable) or --queries FILE (one per line, - for stdin)")
    encoder = _encoder_from_args(args)
    corpus_path = Path(args.corpus)
    if not corpus_path.is_file():
        raise ValueError(f"--corpus {args.corpus}: no such file (give a text file, one text per line, or a .npy "
                         "of vectors written by `deberta-onnx embed`)")
    texts: list[str] | None = None
    if corpus_path.suffix == ".npy":
        corpus = np.load(corpus_path, mmap_mode="r")  # searched in chunks: never loaded whole
        if args.corpus_texts:
            texts = _read_lines(args.corpus_texts)
            if len(texts) != len(corpus):
                raise ValueError(f"--corpus-texts has {len(texts)} lines but {args.corpus} holds {len(corpus)} "
                                 "vectors; give the file the vectors were embedded from")
    else:
        texts = _read_lines(args.corpus)
        corpus = encoder.encode(texts, batch_size=args.batch_size, show_progress=_show_progress(args),
                                dimensions=args.dimensions)
    vectors = encoder.encode(queries, batch_size=args.batch_size, dimensions=args.dimensions)
    if corpus.ndim != 2 or corpus.shape[1] != vectors.shape[1]:
        raise ValueError(f"{args.corpus} holds vectors of shape {corpus.shape[1:]} but the queries have "
                         f"{vectors.shape[1]} dimensions; embed both with the same model (and --dimensions)")
    results = semantic_search(vectors, corpus, top_k=args.top_k, score=args.score)
    for query, hits in zip(queries, results):
        rows = [{"index": h.index, "score": h.score, **({"text": texts[h.index]} if texts else {})} for h in hits]
        if args.json:
            print(json.dumps({"query": query, "hits": rows}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for rank, row in enumerate(rows, 1):
            print(f"  {rank:>3}. {row['score']:.4f}  [{row['index']}]  {row.get('text', '')}".rstrip())
    return 0


def _pair(line: str, number: int) -> tuple[str, str]:
    if "\t" not in line:
        raise ValueError(f"line {number} has no tab; with --pairs each line is TEXT<TAB>TEXT_PAIR")
    first, second = line.split("\t", 1)
    return first, second


def _classify(args: argparse.Namespace) -> int:
    from .classifier import SequenceClassifier, TokenClassifier
    from .contract import TASK_SEQUENCE_CLASSIFICATION, TASK_TOKEN_CLASSIFICATION
    from .errors import TaskMismatchError
    from .manifest import load_manifest

    task = load_manifest(args.model_dir).task
    lines = _read_lines(args.input)
    rows: list[dict[str, Any]]
    if task == TASK_SEQUENCE_CLASSIFICATION:
        model = _encoder_from_args(args, SequenceClassifier)
        inputs = [_pair(line, n) for n, line in enumerate(lines, 1)] if args.pairs else lines
        scores = model.probabilities(inputs, batch_size=args.batch_size, show_progress=_show_progress(args))
        rows = [{"label": model.labels[int(row.argmax())], "score": float(row.max()),
                 "scores": {label: float(value) for label, value in zip(model.labels, row)}} for row in scores]
    elif task == TASK_TOKEN_CLASSIFICATION:
        if args.pairs:
            raise ValueError("--pairs is for sequence classifiers; a token classifier labels single texts")
        model = _encoder_from_args(args, TokenClassifier)
        spans = model.predict(lines, batch_size=args.batch_size, aggregation=args.aggregation,
                              show_progress=_show_progress(args))
        rows = [{"text": text, "spans": [span._asdict() for span in found]} for text, found in zip(lines, spans)]
    else:
        raise TaskMismatchError(f"{args.model_dir} holds an embedding model; use `deberta-onnx embed` or "
                                "`deberta-onnx search` with it")
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _add_progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                       help="show a progress bar (default: when stderr is a terminal)")
    group.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")


def _add_search_parser(commands: Any) -> None:
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
    _add_progress_flags(search)
    _add_load_flags(search)
    search.set_defaults(run=_search)


def _add_classify_parser(commands: Any) -> None:
    classify = commands.add_parser(
        "classify", help="label texts or text pairs with an exported classifier (JSON lines out)",
        description="Run a sequence classifier (one label per text, or per TEXT<TAB>TEXT_PAIR line with --pairs: "
                    "NLI, rerankers) or a token classifier (labelled spans, e.g. NER) over a file of lines; "
                    "prints one JSON object per line.",
    )
    classify.add_argument("model_dir", help="a folder exported from a ...ForSequenceClassification or "
                                            "...ForTokenClassification checkpoint")
    classify.add_argument("--input", required=True, help="text file, one input per line; - for stdin")
    classify.add_argument("--pairs", action="store_true", help="each line is TEXT<TAB>TEXT_PAIR (sequence classifiers)")
    classify.add_argument("--aggregation", default="first", choices=list(AGGREGATIONS),
                          help="how token labels become spans (token classifiers; default first)")
    classify.add_argument("--output", default=None, help="write the JSON lines here instead of stdout")
    classify.add_argument("--batch-size", type=int, default=None,
                          help="inputs per model call (default 32; with --max-tokens, a cap on rows)")
    _add_progress_flags(classify)
    _add_load_flags(classify)
    classify.set_defaults(run=_classify)


# --- the parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deberta-onnx",
        description="Export DeBERTa checkpoints to ONNX with fused pooling, and run them without PyTorch: "
                    "`export` writes a model folder (needs the export extra); `embed`, `search`, `classify` and "
                    "`info` use it with the base install, `serve` with the server extra, `bench` (against "
                    "PyTorch) with the export and bench extras.",
        epilog="Run `deberta-onnx COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export", help="export a checkpoint to a model folder (needs the export extra)",
        description="Export a Hugging Face DeBERTa checkpoint to OUT_DIR: model.onnx (encoder + pooling), "
                    "tokenizer.json and manifest.json, validated against PyTorch. SRC is a local checkpoint "
                    "folder, a hub id (offline when cached), or random:SHAPE for a checkpoint with random weights "
                    "(shapes: deberta-v3-xsmall, -small, -base, -large).",
    )
    export.add_argument("src", help="checkpoint folder, hub id, or random:deberta-v3-base")
    export.add_argument("out_dir", help="model folder to write (built beside it, renamed into place at the end)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    export.add_argument("--pooling", default=None, choices=list(POOLINGS),
                        help="pooling fused into the graph: masked mean of the token vectors, the [CLS] token's "
                             "vector, or the masked per-dimension maximum (default: a sentence-transformers "
                             "checkpoint's own, else mean)")
    export.add_argument("--normalize", action="store_const", const=True, default=None,
                        help="L2-normalise the sentence vectors inside the graph (default: as a "
                             "sentence-transformers checkpoint's Normalize module says, else off)")
    export.add_argument("--token-embeddings", action="store_true",
                        help="add a second output, token_embeddings [batch, sequence, hidden], for "
                             "Encoder.encode_tokens (large: off by default)")
    export.add_argument("--task", default=None, choices=list(TASKS),
                        help="embedding (encoder + pooling), or a classifier's head with logits out (default: "
                             "what the checkpoint is; --task embedding exports any checkpoint's encoder alone)")
    export.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default: the model's)")
    export.add_argument("--no-validate", action="store_true",
                        help="skip the comparison with PyTorch and the precisions' quality gate (not advised)")
    export.add_argument("--atol", type=float, default=1e-4, help="largest max |diff| allowed against PyTorch")
    export.add_argument("--tokenizer", default="sentencepiece", choices=["sentencepiece", "transformers"],
                        help="tokenizer.json from the checkpoint's spm.model (ids as SentencePiece's, default) or "
                             "from the installed transformers' fast tokenizer")
    export.add_argument("--no-optimize", action="store_true",
                        help="export DeBERTa's attention as transformers writes it, without the graph speed-ups")
    export.add_argument("--triton", action="store_true",
                        help="also write a Triton Inference Server model repository to OUT_DIR/triton/NAME/ "
                             "(config.pbtxt with dynamic batching, the model under version 1); clients tokenize "
                             "with OUT_DIR/tokenizer.json")
    export.add_argument("--triton-name", default=None, help="the Triton model name (default: OUT_DIR's name)")
    export.add_argument("--triton-max-batch-size", type=int, default=64,
                        help="largest batch Triton's dynamic batcher forms (default 64)")
    export.add_argument("--triton-max-queue-delay-us", type=int, default=1000,
                        help="how long Triton may hold a request to batch it with others (default 1000)")
    export.add_argument("--precision", action="append", default=None, metavar="NAMES",
                        help="variants to write, comma-separated or repeated: fp32, fp16, int8-dynamic, int8-static "
                             "(default fp32; fp32 is always written, as the reference)")
    export.add_argument("--calibration", default=None, metavar="FILE",
                        help="int8-static: text file, one sentence per line, that fixes the activation scales "
                             "(default: the 300 shipped sentences the quality gate does not hold out)")
    export.add_argument("--min-cosine-fp16", type=float, default=0.999, metavar="COSINE",
                        help="quality gate: lowest cosine to the fp32 PyTorch vector allowed for fp16 (default 0.999)")
    export.add_argument("--min-cosine-int8", type=float, default=0.99, metavar="COSINE",
                        help="quality gate: the same for int8-dynamic and int8-static (default 0.99)")
    export.add_argument("--fallback", action="store_true",
                        help="when a precision fails the quality gate, try its safer recipes instead of failing")
    export.add_argument("--quiet", action="store_true", help="no progress bars or report")
    export.set_defaults(run=_export)

    embed = commands.add_parser(
        "embed", help="encode a file of texts (one per line) into a .npy of sentence vectors",
        description="Encode texts, one per line, into a [n, hidden] float32 .npy file, in input order.",
    )
    embed.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    embed.add_argument("--input", required=True, help="text file, one text per line; - for stdin")
    embed.add_argument("--output", required=True, help="where to write the .npy")
    embed.add_argument("--batch-size", type=int, default=None,
                       help="texts per model call (default 32; with --max-tokens, a cap on rows)")
    embed.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    embed.add_argument("--no-truncate", action="store_true", help="fail on texts longer than the model's maximum")
    embed.add_argument("--dimensions", type=int, default=None,
                       help="Matryoshka truncation: keep the first N dimensions (renormalised when normalising)")
    _add_progress_flags(embed)
    _add_load_flags(embed)
    embed.set_defaults(run=_embed)

    bench = commands.add_parser(
        "bench", help="compare the runtime with PyTorch: latency, throughput, memory, parity (needs the export and "
                      "bench extras)",
        description="Benchmark model folders against the PyTorch reference (transformers eager + masked mean), "
                    "interleaved in one process: a batch x sequence grid with half the rows padded, and a corpus of "
                    "texts of 5 to 250 tokens encoded end to end. Every precision variant in each folder and every "
                    "run path the runtime offers is measured. Writes results.json, results.md and throughput.png "
                    "to --out. Needs `pip install torch==2.13.0 && pip install 'deberta-onnx[export,bench]'`.",
    )
    bench.add_argument("models", nargs="+", metavar="MODEL_DIR",
                       help="model folders (LABEL=DIR to name a row); folders from one source share one reference")
    bench.add_argument("--out", required=True, help="folder for results.json, results.md and throughput.png")
    bench.add_argument("--quick", action="store_true",
                       help="CI mode: shapes 1x32 and 8x128, a 200-text corpus, few calls")
    bench.add_argument("--reference", default=None,
                       help="PyTorch checkpoint to compare with (default: the manifest's source; random:SHAPE "
                            "sources are rebuilt)")
    bench.add_argument("--shapes", default=None, help="grid as BATCHxSEQ,... (default 1x32,8x128,32x128,128x128,64x512); none: corpus only")
    bench.add_argument("--corpus-size", type=int, default=None, help="texts in the corpus (default 10000; 0 skips)")
    bench.add_argument("--corpus-batch-size", type=int, default=None, help="texts per call on the corpus (default 32)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: the CPU, and CUDA too where onnxruntime-gpu and torch see a GPU")
    bench.add_argument("--precisions", default=None, help="variants to run, comma-separated (default all)")
    bench.add_argument("--paths", default=None, help="runtime run paths: plain,iobinding (default all offered)")
    bench.add_argument("--threads", type=int, default=None,
                       help="intra-op threads for ONNX Runtime and PyTorch (default: each library's own)")
    bench.add_argument("--ort-threads", default=None,
                       help="ONNX Runtime thread settings to compare, comma-separated: default, N, N:spin, N:nospin")
    bench.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration and shape (2)")
    bench.add_argument("--min-time", type=float, default=None, help="timed seconds to aim for per configuration "
                                                                     "and shape (3.0)")
    bench.add_argument("--min-calls", type=int, default=None, help="fewest timed calls per configuration and shape (3)")
    bench.add_argument("--max-calls", type=int, default=None, help="most timed calls per configuration and shape (200)")
    bench.add_argument("--rounds", type=int, default=None, help="interleaved rounds the timed calls are split into (3)")
    bench.add_argument("--corpus-rounds", type=int, default=None, help="timed corpus passes per configuration (1)")
    bench.add_argument("--corpus-slices", type=int, default=None,
                       help="the corpus is timed in slices, each run by every configuration in turn (10)")
    bench.add_argument("--no-plot", action="store_true", help="skip throughput.png")
    bench.add_argument("--seed", type=int, default=0, help="seeds the grid's ids and the corpus")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(run=_bench)
    serve = commands.add_parser(
        "serve", help="serve a model folder over HTTP (OpenAI-compatible /v1/embeddings; needs the server extra)",
        description="Serve MODEL_DIR over HTTP: POST /v1/embeddings (OpenAI's request and response shape), "
                    "GET /health, GET /v1/models. Concurrent requests are merged into one model call. "
                    "Queue full: 429; body too large or too many inputs: 413; bad JSON or fields: 400; "
                    "timeout: 504. Stop with Ctrl+C or SIGTERM (in-flight requests finish first).",
    )
    defaults = ServerConfig()
    serve.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    serve.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s: this "
                       "machine only; put a proxy or firewall in front before listening wider)")
    serve.add_argument("--port", type=int, default=defaults.port, help="TCP port (default %(default)s; 0 picks a "
                       "free one, printed at start)")
    serve.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                       help="most texts merged from concurrent requests into one encode call (default "
                            "%(default)s)")
    serve.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="rows per model run inside that call; the merged texts are sorted by length first "
                            "(default %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                       help="how long a queued request waits for others to join its batch (default %(default)s)")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue,
                       help="most texts waiting for the model; a request beyond it gets 429 (default %(default)s)")
    serve.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                       help="largest request body in bytes; larger ones get 413 (default %(default)s)")
    serve.add_argument("--max-inputs", type=int, default=defaults.max_inputs,
                       help="most texts in one request; more get 413 (default %(default)s, as OpenAI)")
    serve.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                       help="seconds a request may wait for its vectors, queue included; then 504 "
                            "(default %(default)s)")
    serve.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=defaults.normalize,
                       help="L2-normalise vectors, after `dimensions` truncation (default on, as OpenAI)")
    serve.add_argument("--model-name", default=defaults.model_name,
                       help="model id to report (default: the folder's name)")
    serve.add_argument("--access-log", action="store_true", default=defaults.access_log,
                       help="log one line per request")
    _add_load_flags(serve)
    serve.set_defaults(run=_serve)

    info = commands.add_parser("info", help="describe a model folder (variants, sizes, validation)",
                               description="Print what a model folder holds, from its manifest: the source "
                                           "checkpoint, task, graph inputs and outputs, pooling, and each variant "
                                           "with its size and validation against PyTorch.")
    info.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(run=_info)

    _add_search_parser(commands)
    _add_classify_parser(commands)
    return parser


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that map onto ``EncoderConfig``."""
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS),
                        help="which exported variant to load (default: the best in the folder for the provider: "
                             "int8-static, then int8-dynamic, then fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files at load")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--io-binding", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse bound device buffers per batch shape (default: on with CUDA, off on the CPU)")
    parser.add_argument("--sequence-bucket", type=int, default=None,
                        help="pad batch lengths to a multiple of N tokens (default: 16 with IO binding, else 1)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="token budget per batch (rows x padded length) instead of a fixed batch size")
    parser.add_argument("--max-buckets", type=int, default=64,
                        help="most batch shapes whose IO-binding buffers (and CUDA graphs) are kept (default 64)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture and replay one CUDA graph per batch shape (CUDA, IO binding)")


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so that cleanup (e.g. of a half-built export folder) runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deberta-onnx``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.run(args))
    except (DebertaOnnxError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
