"""Validation: ONNX Runtime against PyTorch over a grid of shapes with ragged padding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, SENTENCE_EMBEDDING

from ._errors import ValidationError

__all__ = ["DEFAULT_VALIDATION_SHAPES", "make_batch", "validate"]

# (batch, sequence) pairs, none equal to the export's dummy (2 x 8): single tokens, odd lengths, the
# 512 maximum, and batches large enough to hold short, long and all-padding rows together.
DEFAULT_VALIDATION_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 512), (2, 7), (3, 64), (5, 200), (8, 128), (16, 33), (16, 512),
)


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


def validate(
    module: torch.nn.Module,
    model_path: Path,
    *,
    vocab: int,
    max_length: int,
    shapes: Sequence[tuple[int, int]] = DEFAULT_VALIDATION_SHAPES,
    atol: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs both on every shape (sequences capped at ``max_length``) and returns the report.

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
        with torch.no_grad():
            expected = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        (actual,) = session.run([SENTENCE_EMBEDDING], {INPUT_IDS: ids, ATTENTION_MASK: mask})
        finite = bool(np.isfinite(actual).all())
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        rows.append({
            "batch": batch,
            "sequence": sequence,
            "padded_rows": int((mask.sum(1) < sequence).sum()),
            "max_abs_diff": float(diff.max()) if finite else float("inf"),
            "worst_row": int(diff.max(axis=1).argmax()) if finite else -1,
            "finite": finite,
        })
    worst = max(rows, key=lambda r: r["max_abs_diff"])
    report = {"atol": atol, "shapes": rows, "worst": worst, "passed": worst["max_abs_diff"] <= atol}
    if not report["passed"]:
        what = "non-finite output" if not worst["finite"] else f"max |diff| {worst['max_abs_diff']:.3g} > atol {atol:g}"
        raise ValidationError(
            f"ONNX Runtime and PyTorch disagree: {what} at batch {worst['batch']} x sequence {worst['sequence']} "
            f"(row {worst['worst_row']}). Nothing was written.",
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
