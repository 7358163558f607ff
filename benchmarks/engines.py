"""ONNX Runtime against OpenVINO on one model folder: each precision on each engine, in one process, interleaved.

    python benchmarks/engines.py models/base --threads 2 --shapes 1x32,8x128 --corpus 100 --rounds 3

Every configuration loads the same folder through ``Encoder`` (same tokenizer, batching and pooling; only
``EncoderConfig.engine`` and ``precision`` differ). The grid shapes time one model call on random ids
(``workloads.grid_batch``: half the rows padded); the corpus times ``encode`` end to end on texts of 5 to 268
tokens built from the shipped sentences. Configurations take turns call by call, round by round; each row reports
the median call (grid) or the best pass (corpus), its ratio to ONNX Runtime's at the same precision (fp32 for
bf16), and the min cosine of its corpus vectors to ONNX Runtime fp32's. Writes JSON to --out when given.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.benchmarks.environment import cpu_features, cpu_name
from deberta_onnx.benchmarks.timing import SETTLE_S, Timer
from deberta_onnx.benchmarks.workloads import build_corpus, grid_batch, parse_shapes
from deberta_onnx.export.testing import shipped_sentences
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import TOKENIZER_FILE
from deberta_onnx.runtime.postprocess import row_cosine

CONFIGS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
           ("onnxruntime", "int8-static"), ("openvino", "int8-static"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1x32,8x128")
    parser.add_argument("--corpus", type=int, default=100, help="texts in the corpus (0: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per shape and round")
    parser.add_argument("--configs", default=",".join(f"{e}:{p}" for e, p in CONFIGS))
    parser.add_argument("--settle-ms", type=float, default=SETTLE_S * 1000,
                        help="pause before each timed call, so that the previous configuration's ONNX Runtime threads "
                             "have stopped spinning (they spin after a call by default and would take the next "
                             "configuration's cores)")
    parser.add_argument("--out")
    args = parser.parse_args()
    encoders: dict[str, Encoder] = {}
    for item in args.configs.split(","):
        engine, _, precision = item.partition(":")
        encoders[f"{engine} {precision}"] = Encoder(args.model_dir, config=EncoderConfig(
            engine=engine, precision=precision, intra_op_threads=args.threads, verify_checksums=False))
    first = next(iter(encoders.values()))
    model = first.manifest.model
    timers: dict[str, dict[str, Timer]] = {name: {} for name in encoders}

    def timer(name: str, label: str) -> Timer:
        return timers[name].setdefault(label, Timer(settle_s=args.settle_ms / 1000))

    workloads: dict[str, Any] = {}
    for shape in parse_shapes(args.shapes):
        workloads[f"{shape.batch}x{shape.sequence}"] = grid_batch(shape, vocab=model.vocab_size,
                                                                  pad_id=model.pad_token_id)
    corpus = build_corpus(shipped_sentences(), Path(args.model_dir) / TOKENIZER_FILE, size=args.corpus, max_tokens=268,
                          seed=0) if args.corpus else []
    vectors: dict[str, np.ndarray] = {}
    for name, encoder in encoders.items():  # warm-up: every shape once, the corpus once (its vectors kept)
        for ids, mask in workloads.values():
            encoder.loaded.runner.run(ids, mask)
        if corpus:
            vectors[name] = encoder.encode(corpus, batch_size=32)
    for _ in range(args.rounds):
        for label, (ids, mask) in workloads.items():
            for _ in range(args.calls):
                for name, encoder in encoders.items():
                    timer(name, label).call(functools.partial(encoder.loaded.runner.run, ids, mask), len(ids))
        if corpus:
            for name, encoder in encoders.items():
                timer(name, "corpus").call(functools.partial(encoder.encode, corpus, batch_size=32), len(corpus))
    times = {name: {label: t.samples.seconds for label, t in labels.items()} for name, labels in timers.items()}
    rows = []
    for name, samples in times.items():
        engine, precision = name.split(" ")
        base = f"onnxruntime {'fp32' if precision == 'bf16' else precision}"
        row: dict[str, Any] = {"engine": engine, "precision": precision}
        for label, values in samples.items():
            value = min(values) if label == "corpus" else statistics.median(values)
            reference = min(times[base][label]) if label == "corpus" else statistics.median(times[base][label])
            row[label] = {"ms": value * 1000, "vs_onnxruntime": reference / value}
            if label == "corpus":
                row[label]["texts_per_s"] = len(corpus) / value
        if corpus and "onnxruntime fp32" in vectors:
            row["min_cosine_to_ort_fp32"] = float(row_cosine(vectors[name].astype(np.float64),
                                                             vectors["onnxruntime fp32"].astype(np.float64)).min())
        rows.append(row)
    document = {"cpu": cpu_name(), "extensions": cpu_features(), "threads": args.threads, "rounds": args.rounds,
                "calls": args.calls, "corpus_texts": len(corpus), "model": str(args.model_dir), "rows": rows}
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
