"""How length-sorted texts are cut into batches: sequence buckets, a row cap or a token budget per batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Rows ``start:stop`` of a longest-first ordering, padded to ``width`` tokens.

    ``capacity`` is how many rows a batch of this width may hold; a batch that ends the ordering may hold
    fewer, and callers that need fixed shapes (CUDA graphs) pad it up to ``capacity`` with empty rows.
    """

    start: int
    stop: int
    width: int
    capacity: int


def bucket_width(longest: int, multiple_of: int, max_length: int) -> int:
    """The padded width of a batch whose longest row has ``longest`` tokens: rounded up to ``multiple_of``,
    but never past ``max_length`` (nor below ``longest``), and at least one token."""
    longest = max(longest, 1)
    return min(-(-longest // multiple_of) * multiple_of, max(max_length, longest))


def batch_capacity(width: int, *, batch_size: int | None, max_tokens: int | None) -> int:
    """Rows per batch at a given width: ``batch_size``, or as many as fit ``max_tokens`` padded tokens (at
    least one), capped at ``batch_size`` when both are given."""
    if max_tokens is None:
        if batch_size is None:
            raise ValueError("give batch_size, max_tokens or both")
        return batch_size
    rows = max(1, max_tokens // width)
    return rows if batch_size is None else min(rows, batch_size)


def plan_batches(
    lengths: Sequence[int], *, batch_size: int | None, max_tokens: int | None, multiple_of: int, max_length: int
) -> Iterator[Batch]:
    """Cuts token lengths sorted longest first into consecutive batches.

    Each batch takes its width from its first (longest) row, so every row fits; with a token budget the row
    count follows the width, which keeps the set of (rows, width) shapes small: one per width, plus the last
    batch.

    Args:
        lengths: token counts, non-increasing.
        batch_size: most rows per batch (``None``: no cap beyond ``max_tokens``).
        max_tokens: most padded tokens (rows x width) per batch (``None``: rows are ``batch_size``).
        multiple_of: the sequence bucket; widths are multiples of it (capped at ``max_length``).
        max_length: the model's longest input.
    """
    start = 0
    while start < len(lengths):
        width = bucket_width(lengths[start], multiple_of, max_length)
        capacity = batch_capacity(width, batch_size=batch_size, max_tokens=max_tokens)
        stop = min(start + capacity, len(lengths))
        yield Batch(start=start, stop=stop, width=width, capacity=capacity)
        start = stop
