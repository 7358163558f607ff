"""The quality gate: a variant's sentence vectors against the fp32 PyTorch reference, on held-out sentences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, SENTENCE_EMBEDDING
from deberta_onnx.runtime.postprocess import row_cosine
from deberta_onnx.runtime.tokenization import TextTokenizer

__all__ = ["BATCH_INVARIANCE", "GATE_BATCH", "HELD_OUT_STRIDE", "HeldOut", "format_quality", "gate_failure",
           "held_out_set", "measure", "split_sentences"]

# Every 4th shipped sentence (the 1st, 5th, 9th, ...; 100 of 400) is held out for the gate; the other 300
# are int8-static's default calibration set, so the gate never scores a text the scales were fitted on.
HELD_OUT_STRIDE = 4
# The held-out texts also run in batches of this many, in file order: short texts then sit beside long ones
# and are padded, which is where dynamic quantization makes a vector depend on its batch.
GATE_BATCH = 8
# int8-static must give the same vector for a text alone and inside a batch, up to this cosine.
BATCH_INVARIANCE = 0.9999


def split_sentences(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Returns ``(calibration, held_out)``: every ``HELD_OUT_STRIDE``-th text, from the first, is held out."""
    held = [text for i, text in enumerate(texts) if i % HELD_OUT_STRIDE == 0]
    rest = [text for i, text in enumerate(texts) if i % HELD_OUT_STRIDE != 0]
    return rest, held


@dataclass(frozen=True)
class HeldOut:
    """The held-out texts as model inputs, one text at a time and in batches, and PyTorch's vectors for them."""

    texts: list[str]
    alone: list[tuple[np.ndarray, np.ndarray]]
    batches: list[tuple[np.ndarray, np.ndarray]]
    reference: np.ndarray


def held_out_set(module: torch.nn.Module, tokenizer: TextTokenizer, texts: Sequence[str]) -> HeldOut:
    """Tokenizes ``texts`` and computes the reference vectors with ``module`` (encoder + pooling) in fp32."""
    ids = tokenizer.encode(list(texts))
    alone = [tokenizer.pad([row]) for row in ids]
    batches = [tokenizer.pad(ids[i : i + GATE_BATCH]) for i in range(0, len(ids), GATE_BATCH)]
    outputs = []
    with torch.no_grad():
        for ids_batch, mask_batch in batches:
            output = module(torch.from_numpy(ids_batch), torch.from_numpy(mask_batch))
            # A graph with token vectors returns (sentence vectors, token vectors); the gate compares the former.
            outputs.append((output[0] if isinstance(output, tuple) else output).numpy())
    reference = np.concatenate(outputs)
    return HeldOut(texts=list(texts), alone=alone, batches=batches, reference=reference.astype(np.float64))


def measure(model_path: Path, held: HeldOut) -> dict[str, Any]:
    """Runs the graph on the held-out texts (alone, then in batches) on the CPU and compares with the reference.

    Returns:
        ``min_cosine`` / ``mean_cosine`` (per text, both runs), ``max_abs_diff``, ``batch_invariance`` (the
        lowest cosine between a text's vector alone and in its batch), the ``worst`` text, ``finite``, ``bytes``.
    """
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def run(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        outputs = [session.run([SENTENCE_EMBEDDING], {INPUT_IDS: ids, ATTENTION_MASK: mask})[0] for ids, mask in pairs]
        return np.concatenate(outputs).astype(np.float64)

    alone, batched = run(held.alone), run(held.batches)
    finite = bool(np.isfinite(alone).all() and np.isfinite(batched).all())
    cosines = {"alone": row_cosine(alone, held.reference), "batched": row_cosine(batched, held.reference)}
    run_name, scores = min(cosines.items(), key=lambda item: item[1].min())
    index = int(scores.argmin())
    both = np.concatenate(list(cosines.values()))
    diff = np.abs(np.concatenate([alone, batched]) - np.concatenate([held.reference, held.reference]))
    return {
        "sentences": len(held.texts),
        "min_cosine": float(both.min()),
        "mean_cosine": float(both.mean()),
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
        "batch_invariance": float(row_cosine(alone, batched).min()),
        "worst": {"index": index, "text": held.texts[index], "cosine": float(scores[index]), "run": run_name},
        "finite": finite,
        "bytes": sum(p.stat().st_size for p in model_path.parent.glob(f"{model_path.name}*")),
    }


def gate_failure(report: dict[str, Any], threshold: float, invariance: float | None) -> str | None:
    """Why ``report`` fails the gate (minimum cosine below ``threshold``, a non-finite output, or, when
    ``invariance`` is given, a text's vector changing with its batch), or ``None`` when it passes."""
    if not report["finite"]:
        return "non-finite output"
    if report["min_cosine"] < threshold:
        worst = report["worst"]
        text = worst["text"] if len(worst["text"]) <= 70 else worst["text"][:67] + "..."
        where = "alone" if worst["run"] == "alone" else f"in a batch of {GATE_BATCH}"
        return (f"min cosine {report['min_cosine']:.8f} < {threshold:.8f}; worst: held-out sentence {worst['index']} "
                f"({where}) {text!r}")
    if invariance is not None and report["batch_invariance"] < invariance:
        return (f"a text's vector alone and inside a batch differ: cosine {report['batch_invariance']:.8f} < "
                f"{invariance:.8f}")
    return None


def format_quality(precision: str, recipe: str, report: dict[str, Any], base_bytes: int) -> str:
    """One line for the terminal."""
    verdict = ""
    if "threshold" in report:
        verdict = f": {'passed' if report['passed'] else 'FAILED'} (>= {report['threshold']:.8f})"
    return (f"{precision:<13} {recipe:<17} cosine min {report['min_cosine']:.8f} mean {report['mean_cosine']:.8f}, "
            f"max|diff| {report['max_abs_diff']:.1e}, alone vs batched {report['batch_invariance']:.8f}, "
            f"{report['bytes'] / 1e6:.1f} MB ({report['bytes'] / base_bytes:.2f}x fp32){verdict}")
