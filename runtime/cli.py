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

from .errors import DebertaOnnxError

__all__ = ["main"]


def _export(args: argparse.Namespace) -> int:
    try:
        from deberta_onnx.export import ExportConfig, export_model
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    config = ExportConfig(
        overwrite=args.overwrite,
        pooling=args.pooling,
        max_length=args.max_length,
        validate=not args.no_validate,
        atol=args.atol,
        tokenizer=args.tokenizer,
        optimize=not args.no_optimize,
        quiet=args.quiet,
    )
    result = export_model(args.src, args.out_dir, config)
    print(result.out_dir)
    return 0


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


def _encoder_from_args(args: argparse.Namespace) -> Any:
    from .encoder import Encoder, EncoderConfig

    config = EncoderConfig(
        precision=args.precision,
        intra_op_threads=args.threads,
        verify_checksums=not args.no_verify,
    )
    return Encoder(args.model_dir, config=config)


def _embed(args: argparse.Namespace) -> int:
    texts = _read_lines(args.input)
    encoder = _encoder_from_args(args)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=args.normalize,
                             truncate=not args.no_truncate, show_progress=args.progress)
    _save_npy(vectors, args.output)
    print(f"{args.output}: {vectors.shape[0]} x {vectors.shape[1]} float32 ({encoder.precision})", file=sys.stderr)
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
    for name, variant in manifest.variants.items():
        size = data["files"].get(variant["file"], {}).get("bytes", 0)
        report = variant.get("validation") or {}
        worst = report.get("worst", {}).get("max_abs_diff")
        check = f"max|diff| {worst:.1e} vs PyTorch" if worst is not None else "not validated"
        print(f"variant:    {name:<14} {variant['file']:<24} {size / 1e6:8.1f} MB   {check}")
    optimization = data.get("optimization") or {}
    if optimization.get("enabled"):
        fused = ", ".join(f"{k} {v}" for k, v in sorted(optimization.get("fused_operators", {}).items()))
        print(f"graph:      optimised ({optimization.get('relative_attention_layers_folded', 0)} attention layers "
              f"folded{'; fused ' + fused if fused else ''})")
    else:
        print("graph:      as transformers writes it (exported with --no-optimize)" if optimization else
              "graph:      exported before graph optimisation was recorded")
    print(f"exported:   {data.get('created_at')} with {', '.join(f'{k} {v}' for k, v in data.get('versions', {}).items())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deberta-onnx",
        description="Export DeBERTa checkpoints to ONNX with fused pooling, and run them without PyTorch.",
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
    export.add_argument("--pooling", default="mean", choices=["mean"], help="pooling fused into the graph")
    export.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default: the model's)")
    export.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch (not advised)")
    export.add_argument("--atol", type=float, default=1e-4, help="largest max |diff| allowed against PyTorch")
    export.add_argument("--tokenizer", default="sentencepiece", choices=["sentencepiece", "transformers"],
                        help="tokenizer.json from the checkpoint's spm.model (ids as SentencePiece's, default) or "
                             "from the installed transformers' fast tokenizer")
    export.add_argument("--no-optimize", action="store_true",
                        help="export DeBERTa's attention as transformers writes it, without the graph speed-ups")
    export.add_argument("--quiet", action="store_true", help="no progress bars or report")
    export.set_defaults(run=_export)

    embed = commands.add_parser(
        "embed", help="encode a file of texts (one per line) into a .npy of sentence vectors",
        description="Encode texts, one per line, into a [n, hidden] float32 .npy file, in input order.",
    )
    embed.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    embed.add_argument("--input", required=True, help="text file, one text per line; - for stdin")
    embed.add_argument("--output", required=True, help="where to write the .npy")
    embed.add_argument("--batch-size", type=int, default=32, help="texts per model call (default 32)")
    embed.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    embed.add_argument("--no-truncate", action="store_true", help="fail on texts longer than the model's maximum")
    embed.add_argument("--progress", action="store_true", help="show a progress bar")
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

    info = commands.add_parser("info", help="describe a model folder (variants, sizes, validation)",
                               description="Print what a model folder holds, from its manifest.")
    info.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(run=_info)
    return parser


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that map onto ``EncoderConfig``."""
    parser.add_argument("--precision", default=None, help="which exported variant to load (default: the best)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files at load")


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
