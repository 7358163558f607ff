"""Stage one, second half: tokenized inputs -> padded batches of neighbours in token length.

Inputs are tokenized chunk by chunk, sorted longest first, and cut into batches by a row cap or a token budget;
each batch is padded to a multiple of the sequence bucket, so that few shapes occur.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Encoding

from .checks import check_positive_int
from .config import (
    AUTO,
    AUTO_FULL_WIDTH,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CPU_MAX_TOKENS,
    DEFAULT_IO_BINDING_BUCKET,
    EncoderConfig,
)
from .tokenization import TextTokenizer, bucket_width

__all__ = [
    "ATTENTION_TENSORS",
    "Batch",
    "BatchPolicy",
    "ModelCall",
    "TokenBatch",
    "batch_capacity",
    "batch_policy",
    "bucket_width",
    "call_memory",
    "capped",
    "encoding_batches",
    "filled_rows",
    "padded_tokens",
    "plan_batches",
    "token_batches",
]

# How many float32 [heads, length, length] score tensors one unfused DeBERTa attention layer holds at its peak
# (content-to-content, content-to-position, position-to-content, their sum, the softmax, ...): measured as peak RSS
# growth over the size of one such tensor, 11.3 on the tiny test graph for single texts of 1,000 to 3,000 tokens.
ATTENTION_TENSORS = 12


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Rows ``start:stop`` of a longest-first ordering, padded to ``width`` tokens.

    ``capacity`` is how many rows a batch of this width may hold; a batch that ends the ordering may hold
    fewer, and callers that need few shapes (CUDA graphs) pad it with empty rows (see ``filled_rows``).
    """

    start: int
    stop: int
    width: int
    capacity: int


def call_memory(rows: int, width: int, heads: int) -> int:
    """Estimated peak bytes of one model call of ``rows`` x ``width`` tokens: its attention score tensors
    (``ATTENTION_TENSORS`` float32 ``[rows, heads, width, width]``), which grow with the square of the length and
    outweigh everything else in the call from a few hundred tokens on."""
    return ATTENTION_TENSORS * rows * heads * width * width * 4


def batch_capacity(width: int, *, batch_size: int | None, max_tokens: int | None,
                   max_call_bytes: int | None = None, heads: int = 1) -> int:
    """Rows per batch at a given width: ``batch_size``, or as many as fit ``max_tokens`` padded tokens (at
    least one), capped at ``batch_size`` when both are given; never more than keep ``call_memory`` under
    ``max_call_bytes`` (but at least one row: a single text over it is refused when the model loads)."""
    if max_tokens is None:
        if batch_size is None:
            raise ValueError("give batch_size, max_tokens or both")
        rows = batch_size
    else:
        rows = max(1, max_tokens // width)
        rows = rows if batch_size is None else min(rows, batch_size)
    if max_call_bytes is not None:
        rows = min(rows, max(1, max_call_bytes // call_memory(1, width, heads)))
    return rows


def filled_rows(rows: int, capacity: int) -> int:
    """Rows a batch of ``rows`` real rows is padded to when shapes must repeat (CUDA graphs replay one shape
    each): the next power of two, at most ``capacity``. A batch size of 32 gives the row counts 1, 2, 4, 8, 16
    and 32, so one text runs a 1-row graph while a corpus needs at most six graphs per width.

    Raises:
        ValueError: ``rows`` is not between 1 and ``capacity``.
    """
    if not 1 <= rows <= capacity:
        raise ValueError(f"rows must be between 1 and the capacity {capacity}, got {rows}")
    return min(capacity, 1 << (rows - 1).bit_length())


def plan_batches(
    lengths: Sequence[int], *, batch_size: int | None, max_tokens: int | None, multiple_of: int, max_length: int,
    max_call_bytes: int | None = None, heads: int = 1,
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
        max_call_bytes: most estimated memory per call (``call_memory``); ``None``: no cap.
        heads: the model's attention heads, for that estimate.
    """
    start = 0
    while start < len(lengths):
        width = bucket_width(lengths[start], multiple_of, max_length)
        capacity = batch_capacity(width, batch_size=batch_size, max_tokens=max_tokens,
                                  max_call_bytes=max_call_bytes, heads=heads)
        stop = min(start + capacity, len(lengths))
        yield Batch(start=start, stop=stop, width=width, capacity=capacity)
        start = stop


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    """How a loaded model cuts inputs into model calls.

    Attributes:
        max_tokens: padded tokens per batch (rows x width); ``None``: rows are the call's ``batch_size``.
        default_rows: rows per batch when the call gives no ``batch_size`` (``None``: as many as
            ``max_tokens`` allows).
        sequence_bucket: widths are padded to a multiple of this.
        fill_rows: pad a short batch with empty rows to the next power of two, at most its capacity (CUDA graphs
            replay fixed shapes; few row counts keep few graphs).
        token_types: the graph takes ``token_type_ids``.
        max_call_bytes: most estimated memory per model call (``call_memory``); ``None``: no cap.
        heads: the model's attention heads, for that estimate.
    """

    max_tokens: int | None = None
    default_rows: int | None = DEFAULT_BATCH_SIZE
    sequence_bucket: int = 1
    fill_rows: bool = False
    token_types: bool = False
    max_call_bytes: int | None = None
    heads: int = 1


def capped(policy: BatchPolicy, max_tokens: int | None) -> BatchPolicy:
    """``policy`` with at most ``max_tokens`` padded tokens per call (``None``: ``policy`` as it is). A call still
    holds at least one row, so a text of ``width`` tokens runs even when ``width`` is over the cap.

    Raises:
        ValueError: ``max_tokens`` is neither None nor a positive int.
    """
    check_positive_int("max_tokens", max_tokens, optional=True)
    if max_tokens is None or (policy.max_tokens is not None and policy.max_tokens <= max_tokens):
        return policy
    return replace(policy, max_tokens=max_tokens)


def batch_policy(config: EncoderConfig, *, device: str, io_binding: bool, token_types: bool, heads: int) -> BatchPolicy:
    """The one place ``EncoderConfig``'s batching fields become a ``BatchPolicy``: ``max_tokens`` (``"auto"``, an
    int or ``None``), ``max_call_memory_mb``, ``sequence_bucket`` and ``cuda_graph``.

    ``"auto"`` is ``DEFAULT_CPU_MAX_TOKENS`` on the CPU, with rows still ``DEFAULT_BATCH_SIZE`` when the call gives
    no batch size, and past ``AUTO_FULL_WIDTH`` tokens no more attention scores per call than a full call of that
    width holds (the memory cap is the smaller of that and ``max_call_memory_mb``); no budget on CUDA.

    Args:
        config: the load configuration.
        device: ``"cpu"`` or ``"cuda"``, where the session runs.
        io_binding: the model runs through IO binding (sequence bucket 16 unless the config gives one).
        token_types: the graph takes ``token_type_ids``.
        heads: the model's attention heads, for the memory estimate (``call_memory``).
    """
    auto = config.max_tokens == AUTO
    max_tokens = config.max_tokens if isinstance(config.max_tokens, int) else None
    max_call_bytes = None if config.max_call_memory_mb is None else config.max_call_memory_mb << 20
    if auto and device == "cpu":
        max_tokens = DEFAULT_CPU_MAX_TOKENS
        # Past 512 tokens, no more attention scores per call than a full call of 512 holds.
        full = call_memory(DEFAULT_CPU_MAX_TOKENS // AUTO_FULL_WIDTH, AUTO_FULL_WIDTH, heads)
        max_call_bytes = full if max_call_bytes is None else min(max_call_bytes, full)
    return BatchPolicy(
        max_tokens=max_tokens,
        # The automatic budget only caps the usual rows; a budget given by the caller may fill a call alone.
        default_rows=DEFAULT_BATCH_SIZE if auto or max_tokens is None else None,
        sequence_bucket=config.sequence_bucket or (DEFAULT_IO_BINDING_BUCKET if io_binding else 1),
        # CUDA graphs replay fixed shapes: a short batch is padded with empty rows to a power of two.
        fill_rows=config.cuda_graph,
        token_types=token_types,
        max_call_bytes=max_call_bytes,
        heads=heads,
    )


class TokenBatch(NamedTuple):
    """One model call's inputs and where its rows go."""

    rows: list[int]  # positions in the caller's input list
    encodings: list[Encoding]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None  # only for graphs that take segment ids


@dataclass(frozen=True)
class ModelCall:
    """One model call of a plan, not yet run: which of the caller's inputs it computes, their token counts
    (special tokens included, after truncation), the token positions the call runs (``padded_tokens``: rows x
    width, padding and filler rows included), and ``run()``, which computes their outputs in that order: an array
    whose first axis follows ``rows`` (vectors, logits), or a list of one output per row (a token classifier's
    logits of each input's own length, with its encoding).

    A caller that runs a plan call by call (the server) can stop between calls, or skip a call whose inputs
    nobody waits for any more.
    """

    rows: list[int]
    token_counts: list[int]
    run: Callable[[], Any]
    padded_tokens: int = 0


def token_batches(
    tokenizer: TextTokenizer,
    items: Sequence[str | tuple[str, str]],
    policy: BatchPolicy,
    batch_size: int | None,
    *,
    truncate: bool,
    details: bool = False,
    show_progress: bool = False,
) -> Iterator[TokenBatch]:
    """Tokenizes ``items`` chunk by chunk and yields padded batches of neighbours in token length.

    Each batch is padded to a multiple of ``policy.sequence_bucket`` tokens; with ``policy.max_tokens`` it holds
    as many inputs as fit that many padded tokens (``batch_size`` then caps the rows). With ``fill_rows`` a short
    batch is filled with empty rows to the next power of two, at most a full batch (``rows`` names only the real
    ones).

    Args:
        tokenizer: the model's tokenizer.
        items: texts, or ``(text, text_pair)`` tuples.
        policy: the loaded model's batching.
        batch_size: most rows per call; ``None``: ``policy.default_rows`` (32, or no cap beyond an explicit
            ``max_tokens``).
        truncate: cut inputs longer than the model's maximum; if false, raise instead.
        details: keep token strings and character offsets in the encodings.
        show_progress: show a progress bar (tqdm) over the inputs.

    Raises:
        ValueError: ``batch_size`` is neither None nor a positive int, or ``truncate`` is false and an
            input is too long.
    """
    check_positive_int("batch_size", batch_size, optional=True)
    rows_cap = _rows_cap(batch_size, policy)
    progress = _progress(len(items), show_progress)
    try:
        for start, stop in _chunks(len(items), batch_capacity(policy.sequence_bucket, batch_size=rows_cap,
                                                              max_tokens=policy.max_tokens)):
            encodings = tokenizer.encodings(items[start:stop], truncate=truncate, offset=start, details=details)
            for batch in encoding_batches(tokenizer, encodings, policy, batch_size, first_row=start):
                yield batch
                if progress is not None:
                    progress.update(len(batch.rows))
    finally:
        if progress is not None:
            progress.close()


def encoding_batches(tokenizer: TextTokenizer, encodings: Sequence[Encoding], policy: BatchPolicy,
                     batch_size: int | None, *, first_row: int = 0) -> Iterator[TokenBatch]:
    """``token_batches`` for inputs already tokenized (e.g. a long context's windows, several per input): padded
    batches of neighbours in token length; a batch's ``rows`` are positions in ``encodings`` plus ``first_row``.

    Raises:
        ValueError: ``batch_size`` is neither None nor a positive int.
    """
    check_positive_int("batch_size", batch_size, optional=True)
    rows_cap = _rows_cap(batch_size, policy)
    bucket = policy.sequence_bucket
    # Longest first: the first batch shows at once whether memory suffices.
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
    plan = plan_batches([len(encodings[i].ids) for i in order], batch_size=rows_cap, max_tokens=policy.max_tokens,
                        multiple_of=bucket, max_length=tokenizer.max_length, max_call_bytes=policy.max_call_bytes,
                        heads=policy.heads)
    for planned in plan:
        rows = order[planned.start : planned.stop]
        chosen = [encodings[i] for i in rows]
        sequences = [e.ids for e in chosen]
        if policy.fill_rows:
            sequences += [[]] * (filled_rows(len(rows), planned.capacity) - len(rows))
        input_ids, mask = tokenizer.pad(sequences, multiple_of=bucket)
        types = None
        if policy.token_types:
            types = tokenizer.pad([e.type_ids for e in chosen], multiple_of=bucket, fill=0)[0]
        yield TokenBatch([first_row + i for i in rows], chosen, input_ids, mask, types)


def padded_tokens(lengths: Sequence[int], policy: BatchPolicy, batch_size: int | None, *, max_length: int) -> int:
    """How many token positions (rows x padded width, padding included) ``token_batches`` runs for inputs of
    these token counts, in any order: the cost of one call of ``Encoder.encode`` or a classifier on them.

    Args:
        lengths: tokens per input (``token_count``), in the order they would be passed.
        policy, batch_size: as ``token_batches`` takes them.
        max_length: the tokenizer's maximum length.
    """
    rows_cap = _rows_cap(batch_size, policy)
    bucket = policy.sequence_bucket
    total = 0
    for start, stop in _chunks(len(lengths), batch_capacity(bucket, batch_size=rows_cap, max_tokens=policy.max_tokens)):
        chunk = sorted(lengths[start:stop], reverse=True)
        for planned in plan_batches(chunk, batch_size=rows_cap, max_tokens=policy.max_tokens, multiple_of=bucket,
                                    max_length=max_length):
            rows = planned.stop - planned.start
            if policy.fill_rows:
                rows = filled_rows(rows, planned.capacity)
            total += rows * planned.width
    return total


def _rows_cap(batch_size: int | None, policy: BatchPolicy) -> int | None:
    rows = batch_size if batch_size is not None else policy.default_rows
    return DEFAULT_BATCH_SIZE if rows is None and policy.max_tokens is None else rows


def _chunks(total: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Splits ``range(total)`` into tokenization chunks of many batches each: large enough for length
    sorting to pay off, small enough that 100,000 texts never sit tokenized in memory at once."""
    step = min(max(batch_size * 64, 4096), 65536)
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tokenizers depends on tqdm (through huggingface_hub); imported only when asked

    return tqdm(total=total, unit="text", desc="encode")
