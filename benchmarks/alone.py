"""One configuration alone in this process, on one batch x sequence shape: for shapes too large to hold every
configuration of ``deberta-onnx bench`` in memory at once (32 x 512 and 64 x 512 on a 24 GB machine).

    python benchmarks/alone.py pytorch models/base --shape 64x512             # PyTorch, the folder's source
    python benchmarks/alone.py fp32 models/base --shape 64x512                # the runtime, one model call
    python benchmarks/alone.py fp32 models/base --shape 64x512 --encode       # Encoder.encode, its defaults
    python benchmarks/alone.py fp32 models/base --shape 64x512 --max-tokens none --cpu-arena next-power-of-two

Same batch as the harness's grid (``grid_batch``: the second half of the rows padded), same helpers
(``Timer``, ``RssSampler``). With ``--encode`` (or any of ``--max-tokens``, ``--cpu-arena``,
``--arena-shrink-tokens``, which imply it), ``batch`` texts cut at the model's length go through
``Encoder.encode`` with ``EncoderConfig``'s defaults for the flags not given. Prints one JSON line: each call's
seconds (the first call included: the ones after it are the figure), the process's peak RSS, its RSS once
loaded and after the calls, and the 1-minute load average before and after; ``--save`` writes the pooled
vectors for a parity check. Configurations run in separate processes are not interleaved: read their ratios
loosely.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.benchmarks.backends import Backend, OrtBackend, ThreadSetting, TorchBackend
from deberta_onnx.benchmarks.environment import cpu_features
from deberta_onnx.benchmarks.run import reference_checkpoint
from deberta_onnx.benchmarks.timing import RssSampler, Timer, rss_bytes
from deberta_onnx.benchmarks.workloads import fit_vocab, parse_shapes
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.config import ARENA_CHOICES
from deberta_onnx.runtime.manifest import load_manifest

_ENCODER_FLAGS = ("max_tokens", "cpu_arena", "arena_shrink_tokens")


def _optional_int(text: str) -> int | str | None:
    lowered = text.strip().lower()
    return None if lowered == "none" else "auto" if lowered == "auto" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configuration", help="pytorch, or a precision of the folder (fp32, int8-static)")
    parser.add_argument("model", type=Path, help="model folder written by deberta-onnx export")
    parser.add_argument("--shape", default="64x512", help="BATCHxSEQ (default 64x512)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, either engine (default 2)")
    parser.add_argument("--calls", type=int, default=2, help="calls, the first included (default 2)")
    parser.add_argument("--encode", action="store_true", help="run BATCH full-length texts through Encoder.encode")
    unset = argparse.SUPPRESS
    parser.add_argument("--max-tokens", type=_optional_int, default=unset,
                        help="EncoderConfig.max_tokens: N, auto or none")
    parser.add_argument("--cpu-arena", choices=list(ARENA_CHOICES), default=unset, help="EncoderConfig.cpu_arena")
    parser.add_argument("--arena-shrink-tokens", type=_optional_int, default=unset,
                        help="EncoderConfig.arena_shrink_tokens: N or none")
    parser.add_argument("--save", type=Path, help="write the pooled vectors of the last call here (.npy)")
    args = parser.parse_args()
    (shape,) = parse_shapes(args.shape)
    manifest = load_manifest(args.model)
    model, limit = manifest.model, manifest.max_sequence_length
    ids, mask = fit_vocab(shape, model, seed=0)
    fields: dict[str, Any] = {name: getattr(args, name) for name in _ENCODER_FLAGS if hasattr(args, name)}
    encode = args.encode or bool(fields)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        if args.configuration == "pytorch":
            import torch

            torch.set_num_threads(args.threads)
            source = manifest.source.model
            backend: Backend = TorchBackend(reference_checkpoint(source, Path(scratch)), args.model, model="pytorch",
                                            max_length=limit)
            work = lambda: backend.run(ids, mask)  # noqa: E731
        elif encode:
            if shape.sequence != limit:
                parser.error(f"--encode encodes texts truncated to the model's {limit} tokens: "
                             f"give --shape {shape.batch}x{limit}")
            config = EncoderConfig(precision=args.configuration, intra_op_threads=args.threads,
                                   verify_checksums=False, **fields)
            encoder = Encoder(args.model, config=config)
            texts = [f"word{i} " * (2 * shape.sequence) for i in range(shape.batch)]  # each cut at the limit
            work = lambda: encoder.encode(texts)  # noqa: E731
        else:
            threads = ThreadSetting(intra_op_threads=args.threads)
            backend = OrtBackend(args.model, model=args.model.name, precision=args.configuration,
                                 device="cpu", path="plain", config_fields={}, threads=threads)
            work = lambda: backend.run(ids, mask)  # noqa: E731
        loaded = rss_bytes()
        timer = Timer()
        with RssSampler() as rss:
            for _ in range(args.calls):
                out = timer.call(work, shape.batch)
        after = rss_bytes()
    if args.save:
        np.save(args.save, np.asarray(out))
    print(json.dumps({"configuration": args.configuration, "model": str(args.model), "shape": str(shape),
                      "threads": args.threads, "encode": encode, **fields,
                      "seconds": timer.samples.seconds, "peak_rss_gb": rss.peak / 2**30,
                      "loaded_rss_gb": loaded / 2**30, "after_rss_gb": after / 2**30,
                      "load_average": [load_before, os.getloadavg()[0]], "cpu_features": cpu_features()}))


if __name__ == "__main__":
    main()
