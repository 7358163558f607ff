"""``deberta-onnx bench``: flags that map onto ``deberta_onnx.benchmarks.BenchConfig`` (needs the export and bench
extras). Flags left unset keep the mode's defaults (``BenchConfig`` or ``BenchConfig.quick``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import config_defaults, default_note

__all__ = ["add_parser", "run"]


def _defaults() -> dict[str, Any]:
    try:
        from deberta_onnx.benchmarks import BenchConfig
    except ImportError:
        return {}
    return config_defaults(BenchConfig)


def add_parser(commands: Any, *, with_defaults: bool) -> None:
    """Adds the ``bench`` command; ``with_defaults`` reads the defaults shown in the help from BenchConfig."""
    d = _defaults() if with_defaults else {}
    unset = argparse.SUPPRESS
    parser = commands.add_parser(
        "bench", help="compare the runtime with PyTorch: latency, throughput, memory, parity (needs the export and "
                      "bench extras)",
        description="Benchmark model folders against the PyTorch reference (transformers eager + masked mean), "
                    "interleaved in one process: a batch x sequence grid with half the rows padded, and a corpus of "
                    "texts of 5 to 250 tokens encoded end to end. Every precision variant in each folder and every "
                    "run path the runtime offers is measured. Writes results.json, results.md and throughput.png "
                    "to --out. Needs `pip install torch==2.13.0 && pip install 'deberta-onnx[export,bench]'`.",
    )
    add = parser.add_argument
    add("models", nargs="+", metavar="MODEL_DIR",
        help="model folders (LABEL=DIR to name a row, DIR:fp16,... to run only those variants of it); folders "
             "from one source share one reference")
    add("--out", required=True, help="folder for results.json, results.md and throughput.png")
    add("--encoder-config", action="append", default=unset, metavar="LABEL:FIELD=VALUE",
        help="an EncoderConfig field for the model labelled LABEL (repeatable), e.g. "
             "today:cpu_arena=next-power-of-two; the others keep EncoderConfig's defaults")
    add("--quick", action="store_true", help="CI mode: shapes 1x32 and 8x128, a 200-text corpus, few calls")
    add("--reference", default=unset,
        help="PyTorch checkpoint to compare with (default: the manifest's source; random:SHAPE sources are rebuilt)")
    shapes = ",".join(str(s) for s in d["shapes"]) if "shapes" in d else None
    add("--shapes", default=unset, help=f"grid as BATCHxSEQ,...{default_note(d, 'shapes', shapes)}; none: corpus only")
    add("--corpus-size", type=int, default=unset, help=f"texts in the corpus{default_note(d, 'corpus_size')}; 0 skips")
    add("--corpus-batch-size", type=int, default=unset,
        help=f"texts per call on the corpus{default_note(d, 'corpus_batch_size')}")
    add("--device", default=unset, choices=["auto", "cpu", "cuda"],
        help="auto: the CPU, and CUDA too where onnxruntime-gpu and torch see a GPU")
    add("--precisions", default=unset,
        help="variants to run, comma-separated (default all); bf16 runs the fp32 graph on OpenVINO in bfloat16")
    add("--engines", default=unset,
        help="runtime engines to run each variant on, comma-separated: onnxruntime, openvino (the openvino extra) "
             f"{default_note(d, 'engines', ','.join(d['engines']) if 'engines' in d else None).strip()}")
    add("--paths", default=unset,
        help="runtime run paths: plain,iobinding and, on CUDA, cudagraph (default all offered)")
    add("--tf32", action="store_true", default=unset,
        help="on CUDA, let fp32 matrix products use TF32 in the runtime and PyTorch alike (default off)")
    add("--threads", type=int, default=unset,
        help="intra-op threads for ONNX Runtime and PyTorch (default: each library's own)")
    add("--ort-threads", default=unset,
        help="ONNX Runtime thread settings to compare, comma-separated: default, N, N:spin, N:nospin")
    add("--warmup", type=int, default=unset,
        help=f"untimed calls per configuration and shape{default_note(d, 'warmup')}")
    add("--min-time", dest="min_time_s", type=float, default=unset,
        help=f"timed seconds to aim for per configuration and shape{default_note(d, 'min_time_s')}")
    add("--min-calls", type=int, default=unset,
        help=f"fewest timed calls per configuration and shape{default_note(d, 'min_calls')}")
    add("--max-calls", type=int, default=unset,
        help=f"most timed calls per configuration and shape{default_note(d, 'max_calls')}")
    add("--rounds", type=int, default=unset,
        help=f"interleaved rounds the timed calls are split into{default_note(d, 'rounds')}")
    add("--corpus-rounds", type=int, default=unset,
        help=f"timed corpus passes per configuration{default_note(d, 'corpus_rounds')}")
    add("--corpus-slices", type=int, default=unset,
        help="the corpus is timed in slices, each run by every configuration in turn"
             f"{default_note(d, 'corpus_slices')}")
    add("--no-plot", dest="plot", action="store_false", default=unset, help="skip throughput.png")
    add("--seed", type=int, default=unset, help=f"seeds the grid's ids and the corpus{default_note(d, 'seed')}")
    add("--quiet", dest="progress", action="store_false", default=unset, help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deberta_onnx.benchmarks import BenchConfig, ModelSpec, ThreadSetting, check_extras, parse_shapes, run_benchmark

    check_extras()

    given = {name: value for name, value in vars(args).items()
             if name not in ("models", "out", "quick", "run", "command", "encoder_config")}
    converters = {
        "shapes": parse_shapes,
        "precisions": lambda text: tuple(text.split(",")),
        "engines": lambda text: tuple(text.split(",")),
        "paths": lambda text: tuple(text.split(",")),
        "ort_threads": lambda text: tuple(ThreadSetting.parse(t) for t in text.split(",")),
    }
    for name, convert in converters.items():
        if name in given:
            given[name] = convert(given[name])
    specs = [ModelSpec.parse(text) for text in args.models]
    models = {spec.label: spec for spec in specs}
    if len(models) != len(specs):
        raise ValueError("two model folders carry one label; name them LABEL=DIR")
    for text in getattr(args, "encoder_config", []):
        label, _, field = text.partition(":")
        if label not in models:
            raise ValueError(f"--encoder-config {text}: no model labelled {label!r} ({', '.join(models)})")
        models[label] = models[label].with_field(field)
    given.update(models=tuple(models.values()), out_dir=Path(args.out))
    config = BenchConfig.quick(**given) if args.quick else BenchConfig(**given)
    run_benchmark(config)
    print(Path(args.out) / "results.md")
    return 0
