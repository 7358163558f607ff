"""The quality gate: a variant's sentence vectors (or, for the graphs that say how to feed them, its logits)
against the fp32 PyTorch reference, on held-out sentences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, SENTENCE_EMBEDDING
from deberta_onnx.runtime.postprocess import row_cosine
from deberta_onnx.runtime.tokenization import TextTokenizer

__all__ = [
    "BATCH_INVARIANCE",
    "GATE_BATCH",
    "HELD_OUT_STRIDE",
    "SENTENCE_GATE",
    "Gate",
    "HeldOut",
    "format_quality",
    "gate_failure",
    "gate_feeds",
    "gate_for",
    "held_out_set",
    "measure",
    "output_rows",
    "split_sentences",
]

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


Feed = dict[str, np.ndarray]


def _plain_feed(ids: np.ndarray, mask: np.ndarray) -> Feed:
    return {INPUT_IDS: ids, ATTENTION_MASK: mask}


@dataclass(frozen=True)
class Gate:
    """What the gate compares for one graph: the output, whether its rows are centred first, and how a padded
    ``[batch, sequence]`` batch of texts becomes the graph's feed."""

    output: str
    center: bool
    feed: Callable[[np.ndarray, np.ndarray], Feed]


# An embedding graph's gate: its sentence vectors as they are.
SENTENCE_GATE = Gate(output=SENTENCE_EMBEDDING, center=False, feed=_plain_feed)


def gate_for(module: torch.nn.Module) -> Gate:
    """The sentence vectors of an embedding graph; the logits of a graph with an ``example_feed`` (multiple
    choice: one row of choice logits per text; fill-mask: one row of vocabulary logits per masked position),
    centred per row, as the softmax that turns them into scores ignores a shift of the whole row."""
    feed = getattr(module, "example_feed", None)
    if feed is None:
        return SENTENCE_GATE
    return Gate(output=LOGITS, center=True, feed=feed)


def output_rows(values: np.ndarray, center: bool) -> np.ndarray:
    """An output as float64 rows (its last axis), centred per row if asked."""
    rows = np.asarray(values, dtype=np.float64).reshape(-1, values.shape[-1])
    return rows - rows.mean(axis=1, keepdims=True) if center else rows


@dataclass(frozen=True)
class HeldOut:
    """The held-out texts as model feeds, one text at a time and in batches, the reference rows for them (PyTorch's
    vectors or logits), and what the gate compares (``Gate``)."""

    texts: list[str]
    alone: list[Feed]
    batches: list[Feed]
    reference: np.ndarray
    gate: Gate = SENTENCE_GATE


def gate_feeds(gate: Gate, tokenizer: TextTokenizer, texts: Sequence[str]) -> tuple[list[Feed], list[Feed]]:
    """``texts`` as the gate runs them: one at a time, and in batches of ``GATE_BATCH`` in order."""
    ids = tokenizer.encode(list(texts))
    alone = [gate.feed(*tokenizer.pad([row])) for row in ids]
    batches = [gate.feed(*tokenizer.pad(ids[i : i + GATE_BATCH])) for i in range(0, len(ids), GATE_BATCH)]
    return alone, batches


def held_out_set(module: torch.nn.Module, tokenizer: TextTokenizer, texts: Sequence[str]) -> HeldOut:
    """Tokenizes ``texts`` and computes the reference rows with ``module`` (the exported module) in fp32."""
    gate = gate_for(module)
    alone, batches = gate_feeds(gate, tokenizer, texts)
    outputs = []
    with torch.no_grad():
        for feed in batches:
            output = module(*(torch.from_numpy(array) for array in feed.values()))
            # A graph with token vectors returns (sentence vectors, token vectors); the gate compares the former.
            outputs.append(output_rows((output[0] if isinstance(output, tuple) else output).numpy(), gate.center))
    return HeldOut(texts=list(texts), alone=alone, batches=batches, reference=np.concatenate(outputs), gate=gate)


def measure(model_path: Path, held: HeldOut) -> dict[str, Any]:
    """Runs the graph on the held-out texts (alone, then in batches) on the CPU and compares with the reference.

    Returns:
        ``min_cosine`` / ``mean_cosine`` (per text, both runs), ``max_abs_diff``, ``batch_invariance`` (the
        lowest cosine between a text's vector alone and in its batch), the ``worst`` text, ``finite``, ``bytes``.
    """
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    gate = held.gate

    def run(feeds: list[Feed]) -> np.ndarray:
        return np.concatenate([output_rows(session.run([gate.output], feed)[0], gate.center) for feed in feeds])

    alone, batched = run(held.alone), run(held.batches)
    finite = bool(np.isfinite(alone).all() and np.isfinite(batched).all())
    cosines = {"alone": row_cosine(alone, held.reference), "batched": row_cosine(batched, held.reference)}
    run_name, scores = min(cosines.items(), key=lambda item: item[1].min())
    # Rows per text: 1 for vectors and choice logits, the masked positions for fill-mask.
    index = int(scores.argmin()) // max(1, len(held.reference) // max(1, len(held.texts)))
    both = np.concatenate(list(cosines.values()))
    diff = np.abs(np.concatenate([alone, batched]) - np.concatenate([held.reference, held.reference]))
    return {
        "sentences": len(held.texts),
        "min_cosine": float(both.min()),
        "mean_cosine": float(both.mean()),
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
        "batch_invariance": float(row_cosine(alone, batched).min()),
        "worst": {"index": index, "text": held.texts[index], "cosine": float(scores.min()), "run": run_name},
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
