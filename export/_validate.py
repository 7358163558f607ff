"""Validation: ONNX Runtime against PyTorch over a grid of shapes with ragged padding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, SEQUENCE_AXIS, TOKEN_TYPE_IDS, TensorSpec

from ._errors import ValidationError

__all__ = ["DEFAULT_VALIDATION_SHAPES", "LONG_VALIDATION_SHAPES", "make_batch", "validate"]

# (batch, sequence) pairs, none equal to the export's dummy (2 x 8): single tokens, odd lengths, the
# 512 maximum, and batches large enough to hold short, long and all-padding rows together.
DEFAULT_VALIDATION_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 512), (2, 7), (3, 64), (5, 200), (8, 128), (16, 33), (16, 512),
)
# Added to the default grid for models longer than 512 tokens (sequences are capped at the model's maximum):
# one row at the maximum, a padded pair past 512, and a batch with short, long and all-padding rows.
LONG_VALIDATION_SHAPES: tuple[tuple[int, int], ...] = ((1, 2048), (2, 1000), (4, 1500))


def make_batch(batch: int, sequence: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with random right-padding per row: row 0 is full length, and from batch 4 on the last
    row is all padding (which must give zeros, not NaN)."""
    ids = rng.integers(5, max(vocab, 6), size=(batch, sequence), dtype=np.int64)
    lengths = rng.integers(1, sequence + 1, size=batch)
    lengths[0] = sequence
    if batch >= 4:
        lengths[-1] = 0
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    return ids, mask


def _token_types(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Segment ids as for text pairs: 0 for the first part of each row's tokens, 1 for the rest."""
    lengths = mask.sum(axis=1)
    split = (lengths * rng.uniform(0.3, 0.9, size=len(lengths))).astype(np.int64)
    return ((np.arange(mask.shape[1])[None, :] >= split[:, None]) & (mask > 0)).astype(np.int64)


def _feed(inputs: Sequence[TensorSpec], ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator
          ) -> dict[str, np.ndarray]:
    arrays = {INPUT_IDS: ids, ATTENTION_MASK: mask}
    if any(spec.name == TOKEN_TYPE_IDS for spec in inputs):
        arrays[TOKEN_TYPE_IDS] = _token_types(mask, rng)
    return {spec.name: arrays[spec.name] for spec in inputs}


def _compare(actual: np.ndarray, expected: np.ndarray, spec: TensorSpec, mask: np.ndarray
             ) -> tuple[bool, float, int]:
    """(finite, max |diff|, worst row). Per-token outputs are compared where the mask is 1: what sits at
    padded positions is never read."""
    if len(spec.dims) > 1 and spec.dims[1] == SEQUENCE_AXIS:
        keep = mask.astype(bool)
        actual, expected = np.where(keep[..., None], actual, 0), np.where(keep[..., None], expected, 0)
    finite = bool(np.isfinite(actual).all())
    if not finite:
        return False, float("inf"), -1
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).reshape(len(actual), -1)
    return True, float(diff.max(initial=0.0)), int(diff.max(axis=1, initial=0.0).argmax())


def validate(
    module: torch.nn.Module,
    model_path: Path,
    *,
    vocab: int,
    max_length: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    shapes: Sequence[tuple[int, int]] = DEFAULT_VALIDATION_SHAPES,
    atol: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs both on every shape (sequences capped at ``max_length``), compares every output, and returns the
    report. ``inputs`` and ``outputs`` are the graph's tensor specs, in the module's argument and return order.

    Raises:
        ValidationError: any output is not finite, or max |diff| exceeds ``atol``; the message names the
            worst shape and the report rides on the exception.
    """
    from tqdm.auto import tqdm

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    grid = sorted({(b, min(s, max_length)) for b, s in shapes})
    for batch, sequence in tqdm(grid, desc="validate", unit="shape", disable=not progress):
        ids, mask = make_batch(batch, sequence, vocab, rng)
        feed = _feed(inputs, ids, mask, rng)
        with torch.no_grad():
            result = module(*(torch.from_numpy(array) for array in feed.values()))
        expected = [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]
        actual = session.run([spec.name for spec in outputs], feed)
        compared = [_compare(a, e, spec, mask) for a, e, spec in zip(actual, expected, outputs)]
        worst_output = max(range(len(compared)), key=lambda i: compared[i][1])
        _, max_diff, worst_row = compared[worst_output]
        rows.append({
            "batch": batch,
            "sequence": sequence,
            "padded_rows": int((mask.sum(1) < sequence).sum()),
            "max_abs_diff": max_diff if all(c[0] for c in compared) else float("inf"),
            "worst_row": worst_row,
            "worst_output": outputs[worst_output].name,
            "finite": all(c[0] for c in compared),
        })
    worst = max(rows, key=lambda r: r["max_abs_diff"])
    report = {"atol": atol, "shapes": rows, "worst": worst, "passed": worst["max_abs_diff"] <= atol}
    if not report["passed"]:
        what = "non-finite output" if not worst["finite"] else f"max |diff| {worst['max_abs_diff']:.3g} > atol {atol:g}"
        raise ValidationError(
            f"ONNX Runtime and PyTorch disagree: {what} in {worst['worst_output']} at batch {worst['batch']} x "
            f"sequence {worst['sequence']} (row {worst['worst_row']}). Nothing was written.",
            report,
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table for the terminal."""
    lines = [f"{'batch':>5} {'seq':>5} {'padded':>6} {'max|diff|':>10}"]
    for row in report["shapes"]:
        lines.append(f"{row['batch']:>5} {row['sequence']:>5} {row['padded_rows']:>6} {row['max_abs_diff']:>10.2e}")
    worst = report["worst"]
    verdict = "passed" if report["passed"] else "FAILED"
    lines.append(f"validation {verdict}: worst {worst['max_abs_diff']:.2e} at {worst['batch']}x{worst['sequence']} "
                 f"(atol {report['atol']:g})")
    return "\n".join(lines)
