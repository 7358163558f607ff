"""The quality gate: a variant's outputs against the fp32 PyTorch reference, on held-out sentences: the sentence
vectors of an embedding graph, the start and end logits of a question-answering graph, the logits of a sequence
classifier, token classifier, multiple-choice or fill-mask graph (``Readout``)."""

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
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
    TOKEN_TYPE_IDS,
)
from deberta_onnx.runtime.postprocess import row_cosine
from deberta_onnx.runtime.sentences import HELD_OUT_STRIDE, split_sentences
from deberta_onnx.runtime.tokenization import TextTokenizer

__all__ = ["BATCH_INVARIANCE", "GATED_TASKS", "GATE_BATCH", "HELD_OUT_STRIDE", "RANKED_DOCUMENTS", "ExampleFeed",
           "HeldOut", "Readout", "format_quality", "gate_failure", "gate_feeds", "gate_items", "gate_readout",
           "held_out_set", "measure", "split_sentences"]

# The held-out texts also run in batches of this many, in file order: short texts then sit beside long ones
# and are padded, which is where dynamic quantization makes a vector depend on its batch.
GATE_BATCH = 8
# int8-static must give the same vector for a text alone and inside a batch, up to this cosine.
BATCH_INVARIANCE = 0.9999
# A one-label sequence classifier (a cross-encoder, a reranker) scores each held-out text as a query against this
# many documents, the texts that follow it: its scores are compared per query (``Readout``, kind ``scores``).
RANKED_DOCUMENTS = 4


@dataclass(frozen=True)
class Readout:
    """What the gate compares of a graph's outputs: one vector per held-out text, built from the named outputs.

    ``sentence``: the sentence vector as it is. ``span``: a question-answering graph's start and end logits over
    the row's own tokens, each less its mean there (the span scores are a softmax of them, which a shift of every
    logit leaves alone), side by side; the gate's cosine of two such vectors is the correlation of their logits.
    ``logits``: a sequence classifier's logits ``[batch, labels]``, a multiple-choice graph's choice logits
    ``[batch, choices]`` or a fill-mask graph's vocabulary logits ``[batch, masks, vocab]``, each row of the last
    axis less its mean (again a softmax's input), one input row's rows side by side. ``tokens``: a token
    classifier's logits ``[batch, sequence, labels]``, each real token's labels less their mean, padding left
    out, the row's tokens side by side. ``scores``: a one-label sequence classifier's single logit per pair, where
    a cosine of one value would only compare signs: such a model's score orders the documents of one query (a
    reranker's use; its sigmoid is monotone), so each held-out text is a query paired with ``RANKED_DOCUMENTS``
    texts, and its vector is the scores of its pairs less their mean: the cosine is the correlation of the
    documents' scores, which is what the ranking reads. A shift of every score is not judged (``max_abs_diff``
    compares the same centred values).

    ``pairs``: each held-out text is paired with this many of the texts after it, one input per pair (0: the text
    alone); ``context``: how many following texts make each pair's second text (a question-answering context).
    """

    outputs: tuple[str, ...]
    kind: str  # "sentence", "span", "logits", "tokens" or "scores"
    pairs: int = 0
    context: int = 1

    def vectors(self, outputs: Sequence[np.ndarray], mask: np.ndarray, width: int) -> np.ndarray:
        """float64 ``[rows, features]``, one row per input, from the outputs of one call (``width``: the longest
        row a gate input can have, so that every call's per-token vectors have one length)."""
        values = np.asarray(outputs[0], dtype=np.float64)
        if self.kind in ("sentence", "scores"):
            return values.reshape(len(values), -1)
        keep = mask.astype(bool)
        if self.kind == "tokens":
            centred = np.where(keep[..., None], values - values.mean(axis=-1, keepdims=True), 0.0)
            padded = np.zeros((len(values), width, values.shape[-1]))
            padded[:, : values.shape[1]] = centred
            return padded.reshape(len(values), -1)
        if self.kind == "logits":
            return (values - values.mean(axis=-1, keepdims=True)).reshape(len(values), -1)
        rows = []
        for logits in outputs:
            values = np.asarray(logits, dtype=np.float64)
            counts = np.maximum(keep.sum(axis=1, keepdims=True), 1)
            centred = np.where(keep, values - np.where(keep, values, 0.0).sum(axis=1, keepdims=True) / counts, 0.0)
            padded = np.zeros((len(values), width))
            padded[:, : values.shape[1]] = centred
            rows.append(padded)
        return np.concatenate(rows, axis=1)

    def read(self, run: Callable[[tuple[np.ndarray, ...]], Sequence[np.ndarray]],
             feeds: Sequence[tuple[np.ndarray, ...]], width: int) -> np.ndarray:
        """One vector per held-out text: ``run`` (a graph's outputs for one feed, ``readout.outputs`` in order) on
        each of ``feeds`` in input order, read as ``vectors`` says; for ``scores``, a text's pairs joined into one
        row, less their mean."""
        vectors = np.concatenate([self.vectors(run(feed), feed[1], width) for feed in feeds])
        if self.kind != "scores":
            return vectors
        grouped = vectors.reshape(-1, self.pairs)
        return grouped - grouped.mean(axis=1, keepdims=True)


# The tasks whose lower precisions the gate can judge, and what it compares of each.
_READOUTS = {
    TASK_EMBEDDING: Readout(outputs=(SENTENCE_EMBEDDING,), kind="sentence"),
    # (question, context of the two texts that follow); (premise, hypothesis) or (query, document) pairs.
    TASK_QUESTION_ANSWERING: Readout(outputs=(START_LOGITS, END_LOGITS), kind="span", pairs=1, context=2),
    TASK_SEQUENCE_CLASSIFICATION: Readout(outputs=(LOGITS,), kind="logits", pairs=1),
    TASK_TOKEN_CLASSIFICATION: Readout(outputs=(LOGITS,), kind="tokens"),
    TASK_MULTIPLE_CHOICE: Readout(outputs=(LOGITS,), kind="logits"),
    TASK_FILL_MASK: Readout(outputs=(LOGITS,), kind="logits"),
}
GATED_TASKS = tuple(_READOUTS)
_ONE_SCORE = Readout(outputs=(LOGITS,), kind="scores", pairs=RANKED_DOCUMENTS)


def gate_readout(task: str, labels: int = 0) -> Readout:
    """The gate's ``Readout`` for ``task`` (``labels``: a sequence classifier's; one label reads ``scores``).

    Raises:
        ValueError: a task the gate cannot judge.
    """
    if task not in _READOUTS:
        raise ValueError(f"the quality gate judges {', '.join(GATED_TASKS)} graphs, not {task}")
    return _ONE_SCORE if task == TASK_SEQUENCE_CLASSIFICATION and labels == 1 else _READOUTS[task]


def gate_items(readout: Readout, texts: Sequence[str]) -> list[str | tuple[str, str]]:
    """The gate's inputs made of ``texts``: the texts themselves, or (``readout.pairs``) each text paired with each
    of the next ``pairs`` texts, or with ``context`` of them joined (a question-answering context)."""
    if not readout.pairs:
        return list(texts)
    return [(text, " ".join(texts[(i + 1 + j + k) % len(texts)] for k in range(readout.context)))
            for i, text in enumerate(texts) for j in range(readout.pairs)]


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
                 readout: Readout = _READOUTS[TASK_EMBEDDING], inputs: Sequence[str] = (INPUT_IDS, ATTENTION_MASK)
                 ) -> HeldOut:
    """Tokenizes the gate's inputs made of ``texts`` (``gate_items``) and computes the reference vectors with
    ``module`` (the exported graph's PyTorch module, taking ``inputs``, fed by its ``example_feed`` if it has one)
    in fp32."""
    alone, batches = gate_feeds(tokenizer, gate_items(readout, texts), inputs, getattr(module, "example_feed", None))

    def run(feed: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        output = module(*(torch.from_numpy(array) for array in feed))
        # A graph with token vectors returns (sentence vectors, token vectors); the readout takes what it needs.
        return [t.numpy() for t in (output if isinstance(output, tuple) else (output,))]

    with torch.no_grad():
        reference = readout.read(run, batches, tokenizer.max_length)
    return HeldOut(texts=list(texts), alone=alone, batches=batches, reference=reference, readout=readout,
                   inputs=tuple(inputs), width=tokenizer.max_length)


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
        return held.readout.read(lambda feed: session.run(names, dict(zip(held.inputs, feed))), feeds, held.width)

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
