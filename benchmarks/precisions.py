"""File size, encode time and quality of every precision against fp32 ONNX and against PyTorch, in one run.

    python benchmarks/precisions.py --source random:deberta-v3-base --out /tmp/base-precisions
    python benchmarks/precisions.py --source random:deberta-v3-base+outliers --out /tmp/base-outliers

Exports a random-weight checkpoint (``random:SHAPE``, or ``random:SHAPE+outliers`` with the activation
outliers of trained encoders) with all four precisions to OUT at the default settings (or reuses OUT when it
already holds them), rebuilds the same checkpoint (same seed, same weights) for PyTorch, then encodes a corpus
that is not the quality gate's texts (runs of words cut across the shipped sentences, 5 to 250 tokens) with
every engine, interleaved round by round, and reports the best round of each and the min and mean cosine of
each text's vector to PyTorch's. Absolute times depend on the machine and its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deberta_onnx.benchmarks.timing import Timer
from deberta_onnx.benchmarks.workloads import build_corpus
from deberta_onnx.export import ExportConfig, export_model
from deberta_onnx.export.testing import build_random_checkpoint, masked_mean
from deberta_onnx.export.testing import shipped_sentences as sentences
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import PRECISIONS
from deberta_onnx.runtime.errors import ModelFolderError
from deberta_onnx.runtime.manifest import load_manifest
from deberta_onnx.runtime.postprocess import row_cosine


def _export(source: str, out: Path) -> None:
    try:
        manifest = load_manifest(out)
    except ModelFolderError:  # not exported yet, or an unreadable folder: export it again
        manifest = None
    if manifest is not None and set(manifest.variants) == set(PRECISIONS) and manifest.source.model == source:
        return
    export_model(source, out, ExportConfig(precisions=PRECISIONS, overwrite=True))


def _pytorch(checkpoint: Path, encoder: Encoder, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint).eval()

    def encode(texts: list[str]) -> np.ndarray:
        # The same tokenizer and length-sorted batches as the runtime, so only the model differs.
        ids = encoder.loaded.tokenizer.encode(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.empty((len(texts), encoder.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, mask = (torch.from_numpy(a) for a in encoder.loaded.tokenizer.pad([ids[i] for i in rows]))
                hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                out[rows] = masked_mean(hidden, mask).numpy()
        return out

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="random:deberta-v3-base",
                        help="random:SHAPE or random:SHAPE+outliers[=SCALE] (default %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write or reuse")
    parser.add_argument("--texts", type=int, default=400, help="how many corpus texts to encode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="threads for PyTorch and ONNX Runtime alike")
    args = parser.parse_args()

    if not args.source.startswith("random:"):
        parser.error(f"--source must be random:SHAPE[+outliers], got {args.source!r}")
    _export(args.source, args.out)
    texts = build_corpus(sentences(), args.out / "tokenizer.json", size=args.texts, seed=1)
    torch.set_num_threads(args.threads)
    encoders = {p: Encoder(args.out, config=EncoderConfig(precision=p, intra_op_threads=args.threads))
                for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as scratch:
        shape = args.source[len("random:"):]
        checkpoint = build_random_checkpoint(shape, Path(scratch) / shape)  # seed 0, as the export's
        engines: dict[str, Callable[[list[str]], np.ndarray]] = {"pytorch": _pytorch(checkpoint, encoders["fp32"],
                                                                                     args.batch_size)}
        engines.update({p: functools.partial(e.encode, batch_size=args.batch_size) for p, e in encoders.items()})
        best = {name: float("inf") for name in engines}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, encode in engines.items():
                timer = Timer()
                vectors[name] = timer.call(functools.partial(encode, texts), len(texts))
                best[name] = min(best[name], timer.samples.seconds[0])

    variants = load_manifest(args.out).variants
    size = {p: sum(f.stat().st_size for f in args.out.glob(f"{variants[p].file}*")) for p in PRECISIONS}
    reference = vectors["pytorch"].astype(np.float64)
    manifest = load_manifest(args.out)
    print(f"{args.source}, random weights{' with activation outliers' if manifest.source.outliers else ''}, "
          f"{len(texts)} corpus texts (not the gate's), batch {args.batch_size}, {args.threads} threads, best of "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.2f}\n")
    print("| engine | recipe | file MB | size vs fp32 | encode s | time vs fp32 ONNX | time vs PyTorch "
          "| min / mean cosine vs PyTorch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in engines:
        cosine = row_cosine(vectors[name].astype(np.float64), reference)
        file_mb = f"{size[name] / 1e6:.0f}" if name in size else "-"
        ratio = f"{size[name] / size['fp32']:.2f}" if name in size else "-"
        recipe = (variants[name].recipe or "-") if name in variants else "-"
        print(f"| {name} | {recipe} | {file_mb} | {ratio} | {best[name]:.1f} | {best[name] / best['fp32']:.2f} | "
              f"{best[name] / best['pytorch']:.2f} | {cosine.min():.5f} / {cosine.mean():.5f} |")


if __name__ == "__main__":
    main()
