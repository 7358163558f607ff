"""Quality of each int8 recipe on random-weight checkpoints with and without activation outliers, in one run.

    python benchmarks/outlier_recipes.py --shape tiny
    python benchmarks/outlier_recipes.py --shape deberta-v3-xsmall --scales 1500

For each checkpoint (random weights; then with ``OutlierSpec(scale=S)`` for each ``--scales`` S), exports every
precision at the default settings (thresholds, recipes, fallback) and measures, on a corpus that is not the
quality gate's texts (runs of words cut across the shipped sentences), each text's cosine to PyTorch fp32: the
variants the export kept, and beside them ONNX Runtime's quantizer alone (``plain``: no outlier split, one
scale for the embedding table's rows as for the rest). Quality only: speed on a ``tiny`` shape means nothing
(see ``precisions.py`` for that).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.benchmarks.workloads import build_corpus
from deberta_onnx.export import ExportConfig, Recipe, export_model
from deberta_onnx.export.precision import build_variant, prepare_base
from deberta_onnx.export.testing import OutlierSpec, build_random_checkpoint, masked_mean
from deberta_onnx.export.testing import shipped_sentences as sentences
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, SENTENCE_EMBEDDING
from deberta_onnx.runtime.postprocess import row_cosine
from deberta_onnx.runtime.tokenization import TextTokenizer

# The tests' smallest DeBERTa-v3 shape (tests/conftest.py, "v3-shared"): seconds per export.
_TINY: dict[str, Any] = {"vocab_size": 2000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, "max_position_embeddings": 512, "relative_attention": True,
                         "position_buckets": 8, "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"],
                         "share_att_key": True, "norm_rel_ebd": "layer_norm", "position_biased_input": False}
_FAST = ((1, 1), (2, 7), (5, 40))


def _reference(checkpoint: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint).eval()
    out = []
    for start in range(0, len(texts), 16):
        ids, mask = tokenizer.pad(tokenizer.encode(texts[start : start + 16]))
        with torch.no_grad():
            hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        out.append(masked_mean(hidden, torch.from_numpy(mask)).numpy())
    return np.concatenate(out).astype(np.float64)


def _run(path: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(texts), 16):
        ids, mask = tokenizer.pad(tokenizer.encode(texts[start : start + 16]))
        out.append(session.run([SENTENCE_EMBEDDING], {INPUT_IDS: ids, ATTENTION_MASK: mask})[0])
    return np.concatenate(out).astype(np.float64)


def _one(label: str, shape: str | dict[str, Any], spec: OutlierSpec | None, scratch: Path, size: int) -> list[str]:
    checkpoint = build_random_checkpoint(shape, scratch / f"{label}-ckpt", seed=1, outliers=spec)
    out = scratch / f"{label}-model"
    config = ExportConfig(precisions=("fp16", "int8-dynamic", "int8-static"), quiet=True)
    if isinstance(shape, dict):
        config = dataclasses.replace(config, validation_shapes=_FAST)
    manifest = export_model(checkpoint, out, config).manifest
    tokenizer = TextTokenizer(out / "tokenizer.json", max_length=512, pad_id=0)
    texts = build_corpus(sentences(), out / "tokenizer.json", size=size, seed=1)
    reference = _reference(checkpoint, tokenizer, texts)
    ratio = (manifest["source"].get("outliers") or {}).get("measured_ratio")
    name = f"{label} ({ratio:,.0f}x)" if ratio else label
    rows = []
    for precision, entry in manifest["variants"].items():
        vectors = Encoder(out, config=EncoderConfig(precision=precision)).encode(texts, batch_size=16)
        cosine = row_cosine(vectors.astype(np.float64), reference)
        nodes = entry.get("nodes") or {}
        split = (nodes.get("outlier_split") or {}).get("matmuls_split", 0)
        kept = len(nodes.get("kept_fp32") or [])
        audit = len((entry.get("range_audit") or {}).get("kept_fp32") or {})
        detail = (f"{split} split, {kept} kept fp32" if precision.startswith("int8") else
                  f"{audit} nodes kept fp32 by the range audit" if precision == "fp16" else "")
        gate = entry.get("quality") or {}
        rows.append(f"| {name} | {precision} | {entry.get('recipe') or '-'} | {detail} | "
                    f"{gate.get('min_cosine', 1.0):.5f} | {cosine.min():.5f} / {cosine.mean():.5f} |")
    base = prepare_base(out / "model.onnx", scratch / f"{label}-folded.onnx")
    calibration = [dict(zip((INPUT_IDS, ATTENTION_MASK), tokenizer.pad([ids])))
                   for ids in tokenizer.encode(sentences()[1::4][:300])]
    for precision in ("int8-dynamic", "int8-static"):
        plain = Recipe(precision, "plain", "ONNX Runtime's quantizer alone", split_outliers=False)
        path = scratch / f"{label}-{precision}-plain.onnx"
        build_variant(plain, base, path, calibration=calibration)
        cosine = row_cosine(_run(path, tokenizer, texts), reference)
        rows.append(f"| {name} | {precision} | plain (no split) | - | - | {cosine.min():.5f} / {cosine.mean():.5f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", help="tiny (the tests' shape) or a random shape name")
    parser.add_argument("--scales", default="1500,400,200", help="outlier scales, comma-separated")
    parser.add_argument("--texts", type=int, default=300, help="corpus texts to measure on")
    args = parser.parse_args()
    shape: str | dict[str, Any] = _TINY if args.shape == "tiny" else args.shape
    specs: list[tuple[str, OutlierSpec | None]] = [("random", None)]
    specs += [(f"outliers={s}", OutlierSpec(scale=float(s))) for s in args.scales.split(",") if s]
    print(f"{args.shape}, random weights with and without outliers, {args.texts} corpus texts (not the gate's), "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| checkpoint | precision | recipe | what stays fp32 | gate min cosine | corpus min / mean cosine |")
    print("| --- | --- | --- | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        for label, spec in specs:
            for row in _one(label, shape, spec, Path(scratch), args.texts):
                print(row, flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
