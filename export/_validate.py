"""Validation: ONNX Runtime against PyTorch over a grid of shapes with ragged padding."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from deberta_onnx.runtime.contract import ATTENTION_MASK, INPUT_IDS, SEQUENCE_AXIS, TOKEN_TYPE_IDS, TensorSpec

from ._errors import ValidationError

__all__ = ["DEFAULT_VALIDATION_SHAPES", "LONG_VALIDATION_SHAPES", "ROUNDING_FACTOR", "format_report", "make_batch",
           "validate"]

# (batch, sequence) pairs, none equal to the export's dummy (2 x 8): single tokens, odd lengths, the
# 512 maximum, and batches large enough to hold short, long and all-padding rows together.
DEFAULT_VALIDATION_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 512), (2, 7), (3, 64), (5, 200), (8, 128), (16, 33), (16, 512),
)
# Added to the default grid for models longer than 512 tokens (sequences are capped at the model's maximum):
# one row at the maximum, a padded pair past 512, and a batch with short, long and all-padding rows.
LONG_VALIDATION_SHAPES: tuple[tuple[int, int], ...] = ((1, 2048), (2, 1000), (4, 1500))


# Where the plain tolerance fails, ONNX Runtime may be this many times further from PyTorch's float64 result
# than PyTorch's own fp32 result is, at worst over the shape's rows. Two fp32 computations in different orders
# land about equally far from the exact result (measured: ONNX Runtime 0.8x to 2x PyTorch's distance on AMD Zen 3,
# and 4.2x on an Intel Xeon with AVX-512 and AMX, whose kernels sum in another order, on the 200,000x outlier
# checkpoint of tests/test_outliers.py): 8 leaves room for other CPUs' kernels.
ROUNDING_FACTOR = 8.0


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


def _masked(value: np.ndarray, spec: TensorSpec, mask: np.ndarray) -> np.ndarray:
    """``value`` in float64, per-token outputs zeroed where the mask is 0 (padded positions are never read)."""
    value = value.astype(np.float64)
    if len(spec.dims) > 1 and spec.dims[1] == SEQUENCE_AXIS:
        # [batch, sequence, ...]: the mask spread over the axes after the sequence (none for per-token scalars).
        keep = mask.astype(bool).reshape(mask.shape + (1,) * (value.ndim - 2))
        value = np.where(keep, value, 0.0)
    return value


def _compare(actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float,
             rounding: float = 0.0) -> dict[str, Any]:
    """Compares one output, both masked (``_masked``). Each row (a sentence's vector, a token's vector or
    logits: the last axis) may differ by ``atol + rtol * max|row|`` per element: fp32 rounding scales with the
    largest values that went into a row, not with each element, so an element near zero in a row of large
    values may differ as much as its neighbours. ``rounding`` is allowed besides (see ``validate``).

    Returns ``finite``, ``max_abs_diff``, ``max_rel_diff`` (the largest |diff| over its row's max |value|),
    ``excess`` (the largest |diff| over what its row allows: above 1 fails) and ``worst_row`` (the batch row).
    """
    if not np.isfinite(actual).all():
        rows = np.isfinite(actual).reshape(len(actual), -1).all(axis=1)
        return {"finite": False, "max_abs_diff": float("inf"), "max_rel_diff": float("inf"),
                "excess": float("inf"), "worst_row": int(np.flatnonzero(~rows)[0]),
                "reference_finite": bool(np.isfinite(expected).all())}
    row_diff = np.abs(actual - expected).max(axis=-1, initial=0.0)
    row_scale = np.abs(expected).max(axis=-1, initial=0.0)
    allowed = atol + rtol * row_scale + rounding
    excess = row_diff / allowed
    relative = row_diff / np.maximum(row_scale, np.finfo(np.float64).tiny)
    by_batch_row = excess.reshape(len(actual), -1).max(axis=1, initial=0.0)
    return {"finite": True, "max_abs_diff": float(row_diff.max(initial=0.0)),
            "max_rel_diff": float(relative.max(initial=0.0)), "excess": float(excess.max(initial=0.0)),
            "worst_row": int(by_batch_row.argmax()) if len(by_batch_row) else 0}


def _run_module(module: torch.nn.Module, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*(torch.from_numpy(array) for array in feed.values()))
    return [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]


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
    rtol: float = 1e-5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs both on every shape (sequences capped at ``max_length``), compares every output, and returns the
    report. ``inputs`` and ``outputs`` are the graph's tensor specs, in the module's argument and return order.

    An element passes when |diff| <= ``atol + rtol * max|row|`` (see ``_compare``). Where a shape does not,
    the comparison is made again against PyTorch in float64, allowing besides ``ROUNDING_FACTOR`` times what
    PyTorch's own fp32 result misses the float64 one by (at most, over the shape): a model with large
    activations (trained encoders have them) loses digits to cancellation inside the network, in PyTorch as in
    ONNX Runtime, and an fp32 graph is right when it is no further from the exact result than fp32 PyTorch is.
    A wrong graph is wrong by far more than that.

    Raises:
        ValidationError: any output is not finite, or an element differs by more than its row allows; the
            message names the worst shape, its absolute and relative difference, and the report rides on the
            exception.
    """
    from tqdm.auto import tqdm

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    grid = sorted({(b, min(s, max_length)) for b, s in shapes})
    exact: torch.nn.Module | None = None
    for batch, sequence in tqdm(grid, desc="validate", unit="shape", disable=not progress):
        ids, mask = make_batch(batch, sequence, vocab, rng)
        # Graphs that take more than [batch, sequence] ids say how to feed them (multiple choice, fill-mask).
        example_feed = getattr(module, "example_feed", None)
        feed = example_feed(ids, mask) if example_feed is not None else _feed(inputs, ids, mask, rng)
        expected = [_masked(e, spec, mask) for e, spec in zip(_run_module(module, feed), outputs)]
        actual = [_masked(a, spec, mask) for a, spec in zip(session.run([spec.name for spec in outputs], feed),
                                                             outputs)]
        compared = [_compare(a, e, atol=atol, rtol=rtol) for a, e in zip(actual, expected)]
        row: dict[str, Any] = {}
        if all(c["finite"] for c in compared) and max(c["excess"] for c in compared) > 1.0:
            if exact is None:
                exact = copy.deepcopy(module).double()
            precise = [_masked(e, spec, mask) for e, spec in zip(_run_module(exact, feed), outputs)]
            misses = [float(np.abs(e - p).max(initial=0.0)) for e, p in zip(expected, precise)]
            compared = [_compare(a, p, atol=atol, rtol=rtol, rounding=ROUNDING_FACTOR * miss)
                        for a, p, miss in zip(actual, precise, misses)]
            row["float64_reference"] = True
            row["pytorch_fp32_rounding"] = max(misses)
        worst_output = max(range(len(compared)), key=lambda i: compared[i]["excess"])
        rows.append({
            "batch": batch,
            "sequence": sequence,
            "padded_rows": int((mask.sum(1) < sequence).sum()),
            "max_abs_diff": max(c["max_abs_diff"] for c in compared),
            "max_rel_diff": max(c["max_rel_diff"] for c in compared),
            "excess": compared[worst_output]["excess"],
            "worst_row": compared[worst_output]["worst_row"],
            "worst_output": outputs[worst_output].name,
            "finite": all(c["finite"] for c in compared),
            "reference_finite": all(c.get("reference_finite", True) for c in compared),
            **row,
        })
    worst = max(rows, key=lambda r: r["excess"])
    report = {"atol": atol, "rtol": rtol, "rounding_factor": ROUNDING_FACTOR, "shapes": rows, "worst": worst,
              "max_abs_diff": max(r["max_abs_diff"] for r in rows),
              "max_rel_diff": max(r["max_rel_diff"] for r in rows), "passed": worst["excess"] <= 1.0}
    if not report["passed"]:
        allowed = f"atol {atol:g} + rtol {rtol:g} x max|row|"
        if worst.get("float64_reference"):
            allowed += (f" + {ROUNDING_FACTOR:g} x PyTorch fp32's own distance from float64 "
                        f"({worst['pytorch_fp32_rounding']:.3g})")
        where = (f"{worst['worst_output']} at batch {worst['batch']} x sequence {worst['sequence']} (row "
                 f"{worst['worst_row']})")
        if not worst["reference_finite"]:
            raise ValidationError(
                f"the checkpoint's own PyTorch output is NaN or infinite ({where}): its weights hold NaN or "
                "infinity, or overflow float32. Fix or re-download the checkpoint. Nothing was written.", report)
        what = "non-finite output" if not worst["finite"] else (
            f"|diff| up to {worst['max_abs_diff']:.3g} ({worst['max_rel_diff']:.3g} of the row's largest value) "
            f"exceeds {allowed} by {worst['excess']:.3g}x")
        raise ValidationError(
            f"ONNX Runtime and PyTorch disagree: {what} in {where}. Nothing was written.",
            report,
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table for the terminal."""
    lines = [f"{'batch':>5} {'seq':>5} {'padded':>6} {'max|diff|':>10} {'relative':>9} {'of limit':>8}"]
    for row in report["shapes"]:
        against = (f"  vs float64 (PyTorch fp32 off by {row['pytorch_fp32_rounding']:.1e})"
                   if row.get("float64_reference") else "")
        lines.append(f"{row['batch']:>5} {row['sequence']:>5} {row['padded_rows']:>6} {row['max_abs_diff']:>10.2e} "
                     f"{row['max_rel_diff']:>9.1e} {row['excess']:>8.2f}{against}")
    worst = report["worst"]
    verdict = "passed" if report["passed"] else "FAILED"
    lines.append(f"validation {verdict}: worst {worst['max_abs_diff']:.2e} ({worst['max_rel_diff']:.1e} relative) at "
                 f"{worst['batch']}x{worst['sequence']}, {worst['excess']:.2f} of the limit (atol {report['atol']:g} + "
                 f"rtol {report['rtol']:g} x max|row|)")
    return "\n".join(lines)
