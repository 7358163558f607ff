"""The quality gate: a variant's outputs against the fp32 PyTorch reference, on held-out sentences: the sentence
vectors of an embedding graph, the start and end logits of a question-answering graph, the logits of a
multiple-choice or fill-mask graph (``Readout``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.runtime.contract import (
    ATTENTION_MASK,
    END_LOGITS,
    INPUT_IDS,
    LOGITS,
    SENTENCE_EMBEDDING,
    START_LOGITS,
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TOKEN_TYPE_IDS,
)
from deberta_onnx.runtime.postprocess import row_cosine
from deberta_onnx.runtime.tokenization import TextTokenizer

__all__ = ["BATCH_INVARIANCE", "GATED_TASKS", "GATE_BATCH", "HELD_OUT_STRIDE", "ExampleFeed", "HeldOut", "Readout",
           "format_quality", "gate_failure", "gate_feeds", "gate_items", "gate_readout", "held_out_set", "measure",
           "split_sentences"]

# Every 4th shipped sentence (the 1st, 5th, 9th, ...; 100 of 400) is held out for the gate; the other 300
# are int8-static's default calibration set, so the gate never scores a text the scales were fitted on.
HELD_OUT_STRIDE = 4
# The held-out texts also run in batches of this many, in file order: short texts then sit beside long ones
# and are padded, which is where dynamic quantization makes a vector depend on its batch.
GATE_BATCH = 8
# int8-static must give the same vector for a text alone and inside a batch, up to this cosine.
BATCH_INVARIANCE = 0.9999


@dataclass(frozen=True)
class Readout:
    """What the gate compares of a graph's outputs: one vector per input row, built from the named outputs.

    ``sentence``: the sentence vector as it is. ``span``: a question-answering graph's start and end logits over
    the row's own tokens, each less its mean there (the span scores are a softmax of them, which a shift of every
    logit leaves alone), side by side; the gate's cosine of two such vectors is the correlation of their logits.
    ``logits``: a multiple-choice graph's choice logits ``[batch, choices]`` or a fill-mask graph's vocabulary logits
    ``[batch, masks, vocab]``, each row of the last axis less its mean (again a softmax's input), one input row's
    rows side by side.
    """

    outputs: tuple[str, ...]
    kind: str  # "sentence", "span" or "logits"

    def vectors(self, outputs: Sequence[np.ndarray], mask: np.ndarray, width: int) -> np.ndarray:
        """float64 ``[rows, features]`` from the outputs of one call (``width``: the longest row a gate input can
        have, so that every call's span vectors have one length)."""
        if self.kind == "sentence":
            return np.asarray(outputs[0], dtype=np.float64)
        if self.kind == "logits":
            values = np.asarray(outputs[0], dtype=np.float64)
            return (values - values.mean(axis=-1, keepdims=True)).reshape(len(values), -1)
        keep = mask.astype(bool)
        rows = []
        for logits in outputs:
            values = np.asarray(logits, dtype=np.float64)
            counts = np.maximum(keep.sum(axis=1, keepdims=True), 1)
            centred = np.where(keep, values - np.where(keep, values, 0.0).sum(axis=1, keepdims=True) / counts, 0.0)
            padded = np.zeros((len(values), width))
            padded[:, : values.shape[1]] = centred
            rows.append(padded)
        return np.concatenate(rows, axis=1)


# The tasks whose lower precisions the gate can judge, and what it compares of each.
_READOUTS = {
    TASK_EMBEDDING: Readout(outputs=(SENTENCE_EMBEDDING,), kind="sentence"),
    TASK_QUESTION_ANSWERING: Readout(outputs=(START_LOGITS, END_LOGITS), kind="span"),
    TASK_MULTIPLE_CHOICE: Readout(outputs=(LOGITS,), kind="logits"),
    TASK_FILL_MASK: Readout(outputs=(LOGITS,), kind="logits"),
}
GATED_TASKS = tuple(_READOUTS)


def gate_readout(task: str) -> Readout:
    """The gate's ``Readout`` for ``task``.

    Raises:
        ValueError: a task the gate cannot judge (the export refuses lower precisions for it before).
    """
    if task not in _READOUTS:
        raise ValueError(f"the quality gate judges {', '.join(GATED_TASKS)} graphs, not {task}")
    return _READOUTS[task]


def gate_items(task: str, texts: Sequence[str]) -> list[str | tuple[str, str]]:
    """The gate's inputs made of ``texts``: the texts themselves, or for question answering ``(question, context)``
    pairs of each text and the two that follow it (a context of two sentences)."""
    if task != TASK_QUESTION_ANSWERING:
        return list(texts)
    return [(text, " ".join(texts[(i + 1 + k) % len(texts)] for k in range(2))) for i, text in enumerate(texts)]


def split_sentences(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Returns ``(calibration, held_out)``: every ``HELD_OUT_STRIDE``-th text, from the first, is held out."""
    held = [text for i, text in enumerate(texts) if i % HELD_OUT_STRIDE == 0]
    rest = [text for i, text in enumerate(texts) if i % HELD_OUT_STRIDE != 0]
    return rest, held


@dataclass(frozen=True)
class HeldOut:
    """The held-out inputs as model feeds (arrays in ``inputs`` order), one input at a time and in batches, and the
    reference vectors for them (``readout`` says which outputs make them)."""

    texts: list[str]
    alone: list[tuple[np.ndarray, ...]]
    batches: list[tuple[np.ndarray, ...]]
    reference: np.ndarray
    readout: Readout = _READOUTS[TASK_EMBEDDING]
    inputs: tuple[str, ...] = (INPUT_IDS, ATTENTION_MASK)
    width: int = field(default=0)

    def vectors(self, outputs: Sequence[np.ndarray], feed: tuple[np.ndarray, ...]) -> np.ndarray:
        return self.readout.vectors(outputs, feed[1], self.width)


# A graph's feed made of padded ``[batch, sequence]`` ids and mask, for graphs that take more than those (a
# multiple-choice graph's choices axis, a fill-mask graph's masked positions): the graph module's ``example_feed``.
ExampleFeed = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def gate_feeds(tokenizer: TextTokenizer, items: Sequence[str | tuple[str, str]], inputs: Sequence[str],
               example_feed: ExampleFeed | None = None
               ) -> tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]]]:
    """``(alone, batches)``: each input padded alone, and ``GATE_BATCH`` at a time, as arrays in ``inputs`` order
    (made by ``example_feed`` from the padded ids and mask where the graph has one)."""
    encodings = tokenizer.encodings(list(items))

    def feed(chunk: list[Any]) -> tuple[np.ndarray, ...]:
        ids, mask = tokenizer.pad([e.ids for e in chunk])
        if example_feed is not None:
            made = example_feed(ids, mask)
            return tuple(made[name] for name in inputs)
        arrays = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if TOKEN_TYPE_IDS in inputs:
            arrays[TOKEN_TYPE_IDS] = tokenizer.pad([e.type_ids for e in chunk], fill=0)[0]
        return tuple(arrays[name] for name in inputs)

    alone = [feed([e]) for e in encodings]
    batches = [feed(encodings[i : i + GATE_BATCH]) for i in range(0, len(encodings), GATE_BATCH)]
    return alone, batches


def held_out_set(module: torch.nn.Module, tokenizer: TextTokenizer, texts: Sequence[str], *,
                 task: str = TASK_EMBEDDING, inputs: Sequence[str] = (INPUT_IDS, ATTENTION_MASK)) -> HeldOut:
    """Tokenizes the gate's inputs made of ``texts`` (``gate_items``) and computes the reference vectors with
    ``module`` (the exported graph's PyTorch module, taking ``inputs``, fed by its ``example_feed`` if it has one)
    in fp32."""
    readout = gate_readout(task)
    alone, batches = gate_feeds(tokenizer, gate_items(task, texts), inputs, getattr(module, "example_feed", None))
    vectors = []
    with torch.no_grad():
        for feed in batches:
            output = module(*(torch.from_numpy(array) for array in feed))
            # A graph with token vectors returns (sentence vectors, token vectors); the readout takes what it needs.
            outputs = [t.numpy() for t in (output if isinstance(output, tuple) else (output,))]
            vectors.append(readout.vectors(outputs, feed[1], tokenizer.max_length))
    return HeldOut(texts=list(texts), alone=alone, batches=batches, reference=np.concatenate(vectors),
                   readout=readout, inputs=tuple(inputs), width=tokenizer.max_length)


def measure(model_path: Path, held: HeldOut) -> dict[str, Any]:
    """Runs the graph on the held-out inputs (alone, then in batches) on the CPU and compares its vectors (see
    ``Readout``) with the reference.

    Returns:
        ``min_cosine`` / ``mean_cosine`` (per text, both runs), ``max_abs_diff``, ``batch_invariance`` (the
        lowest cosine between a text's vector alone and in its batch), the ``worst`` text, ``finite``, ``bytes``.
    """
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = list(held.readout.outputs)

    def run(feeds: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        return np.concatenate([held.vectors(session.run(names, dict(zip(held.inputs, feed))), feed)
                               for feed in feeds])

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
