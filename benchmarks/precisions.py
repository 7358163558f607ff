"""File size and encode time of every precision against fp32 ONNX and against PyTorch, measured in one run.

    python benchmarks/precisions.py --shape deberta-v3-base --out /tmp/base-precisions

Exports a random-weight checkpoint of SHAPE with all four precisions to OUT (or reuses OUT when it already
holds them), rebuilds the same checkpoint (same seed, same weights) for PyTorch, then encodes the shipped
sentences with every engine, interleaved round by round, and reports the best round of each. Absolute times
depend on the machine and its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deberta_onnx.benchmarks.timing import Timer
from deberta_onnx.export import ExportConfig, build_random_checkpoint, export_model, masked_mean
from deberta_onnx.export import shipped_sentences as sentences
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import PRECISIONS
from deberta_onnx.runtime.errors import ModelFolderError
from deberta_onnx.runtime.manifest import load_manifest
from deberta_onnx.runtime.postprocess import row_cosine


def _export(shape: str, out: Path) -> None:
    try:
        manifest = load_manifest(out)
    except ModelFolderError:  # not exported yet, or an unreadable folder: export it again
        manifest = None
    wanted = f"random:{shape}"
    if manifest is not None and set(manifest.variants) == set(PRECISIONS) and manifest.source.model == wanted:
        return
    export_model(f"random:{shape}", out, ExportConfig(precisions=PRECISIONS, overwrite=True))


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
    parser.add_argument("--shape", default="deberta-v3-base")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write or reuse")
    parser.add_argument("--texts", type=int, default=400, help="how many shipped sentences to encode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="threads for PyTorch and ONNX Runtime alike")
    args = parser.parse_args()

    _export(args.shape, args.out)
    texts = (sentences() * (args.texts // 400 + 1))[: args.texts]
    torch.set_num_threads(args.threads)
    encoders = {p: Encoder(args.out, config=EncoderConfig(precision=p, intra_op_threads=args.threads))
                for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = build_random_checkpoint(args.shape, Path(scratch) / args.shape)  # seed 0, as the export's
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
    print(f"{args.shape}, random weights, {len(texts)} texts, batch {args.batch_size}, {args.threads} threads, "
          f"best of {args.rounds} rounds\n")
    print("| engine | file MB | size vs fp32 | encode s | time vs fp32 ONNX | time vs PyTorch "
          "| min cosine vs PyTorch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in engines:
        got = vectors[name].astype(np.float64)
        cosine = row_cosine(got, reference).min()
        file_mb = f"{size[name] / 1e6:.0f}" if name in size else "-"
        ratio = f"{size[name] / size['fp32']:.2f}" if name in size else "-"
        print(f"| {name} | {file_mb} | {ratio} | {best[name]:.1f} | {best[name] / best['fp32']:.2f} | "
              f"{best[name] / best['pytorch']:.2f} | {cosine:.5f} |")


if __name__ == "__main__":
    main()
