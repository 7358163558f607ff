"""Plain ``session.run`` against the IO-binding runner, on one session and the same batches, in one run.

    python benchmarks/iobinding.py                          # tiny and deberta-v3-xsmall random models, built here
    python benchmarks/iobinding.py --model models/base      # any exported folder(s)
    python benchmarks/iobinding.py --device cuda --model M  # with onnxruntime-gpu

Per (batch, sequence) shape the two runners take turns call by call, so both see the same machine load;
the result is the ratio of their median call times (above 1: IO binding is faster). Then ``encode`` of
the first ``--texts`` shipped sentences, each path with its defaults (IO binding pads to buckets of 16
tokens). Absolute times depend on what else the machine runs; compare ratios.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deberta_onnx.benchmarks.timing import Timer
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.iobinding import IOBindingRunner
from deberta_onnx.runtime.runners import SessionRunner

# A two-layer, 32-wide DeBERTa-v3: where per-call overhead, not arithmetic, dominates.
TINY = {
    "vocab_size": 4000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "max_position_embeddings": 512, "type_vocab_size": 0, "relative_attention": True,
    "position_buckets": 8, "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"], "share_att_key": True,
    "norm_rel_ebd": "layer_norm", "position_biased_input": False,
}
SHAPES = ((1, 32), (8, 64), (32, 128))
SENTENCES = Path(__file__).resolve().parents[1] / "runtime" / "data" / "sentences.txt"


def build_models(workdir: Path) -> dict[str, Path]:
    """Exports the tiny shape and deberta-v3-xsmall with random weights (speed only; validation skipped)."""
    from deberta_onnx.export import ExportConfig, export_model
    from deberta_onnx.export.testing import build_random_checkpoint

    config = ExportConfig(validate=False, quiet=True)
    tiny = build_random_checkpoint(TINY, workdir / "tiny-checkpoint", seed=0)
    export_model(tiny, workdir / "tiny", config)
    export_model("random:deberta-v3-xsmall", workdir / "xsmall", config)
    return {"tiny": workdir / "tiny", "deberta-v3-xsmall": workdir / "xsmall"}


def alternate(first: Callable[[], object], second: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Median seconds per call of each, calling them in turn for about ``seconds`` (at least 5 calls each)."""
    timers = (Timer(), Timer())
    for fn, timer in ((first, timers[0]), (second, timers[1])):  # warm-up: buffers allocated, arena grown
        timer.warm_up(fn, 2)
    def spent() -> float:
        return sum(sum(timer.samples.seconds) for timer in timers)

    while len(timers[0].samples.seconds) < 5 or spent() < seconds:
        for fn, timer in ((first, timers[0]), (second, timers[1])):
            timer.call(fn, 1)
    return timers[0].samples.summary()["p50_ms"] / 1e3, timers[1].samples.summary()["p50_ms"] / 1e3


def bench(name: str, folder: Path, args: argparse.Namespace, texts: list[str]) -> None:
    load = {"device": args.device, "intra_op_threads": args.threads}
    encoder = Encoder(folder, config=EncoderConfig(**load, io_binding=False))
    device, _, index = encoder.device.partition(":")
    plain = SessionRunner(encoder.session)
    bound = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size, device=device, device_id=int(index or 0))
    rng = np.random.default_rng(0)
    vocab = encoder.manifest.model.vocab_size
    print(f"\n{name} ({folder}, hidden {encoder.hidden_size}, {encoder.device}, "
          f"{args.threads or 'default'} thread(s))")
    print(f"{'batch x seq':>12} {'plain ms':>10} {'IO-bind ms':>11} {'ratio':>7}")
    for rows, width in SHAPES:
        ids = rng.integers(5, vocab, size=(rows, width), dtype=np.int64)
        mask = np.ones((rows, width), dtype=np.int64)
        a, b = alternate(functools.partial(plain.run, ids, mask), functools.partial(bound.run, ids, mask),
                         args.seconds)
        print(f"{rows:>5} x {width:<5} {a * 1e3:>10.3f} {b * 1e3:>11.3f} {a / b:>7.3f}")
    io_encoder = Encoder(folder, config=EncoderConfig(**load, io_binding=True))
    a, b = alternate(lambda: encoder.encode(texts), lambda: io_encoder.encode(texts), args.seconds * 2)
    print(f"{'encode ' + str(len(texts)):>12} {a * 1e3:>10.1f} {b * 1e3:>11.1f} {a / b:>7.3f}   "
          f"({len(texts) / a:.0f} vs {len(texts) / b:.0f} texts/s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=Path, help="exported folder (repeatable); default: build")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per shape and path (default 3)")
    parser.add_argument("--texts", type=int, default=100, help="sentences to encode, of the 400 shipped (default 100)")
    args = parser.parse_args()
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[: args.texts]
    with tempfile.TemporaryDirectory(prefix="bench-iobinding-") as tmp:
        models = {p.name: p for p in args.model} if args.model else build_models(Path(tmp))
        for name, folder in models.items():
            bench(name, folder, args, texts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
