"""Token-budget planning for micro-batching: which queued requests go into the next model call. Pure functions
of token counts (numpy-free, no clock, no queue), called by the batcher on the event loop.

A call of ``Encoder.encode`` (or a classifier) on merged requests sorts their texts by length and pads each
batch of neighbours to its longest (``runtime.batching``); its cost is the padded token positions it runs, which
``batching.padded_tokens`` computes exactly. The planner takes whole requests, oldest first, while the merged
call stays within a budget of padded tokens and a count of texts; a request that would push the call over
either is passed over for this call (it leads a later one), so a long request does not make the short ones
queued with it wait for, and pad to, its length. The oldest request is always taken, alone if it is over the
budget by itself, so nothing waits forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..batching import BatchPolicy, padded_tokens
from ..checks import check_positive_int

__all__ = ["TokenBudget", "plan_batch"]


@dataclass(frozen=True, kw_only=True)
class TokenBudget:
    """Limits of one merged model call, and how the call pads (as the model's ``BatchPolicy`` and
    ``batch_size`` do).

    Attributes:
        max_texts: the most texts per call (``ServerConfig.max_batch_size``).
        max_padded_tokens: the most padded token positions per call (``None``: texts alone limit the call).
        batch_size: rows per model run inside the call (``ServerConfig.batch_size``).
        policy: the loaded model's batching (``LoadedModel.policy``): sequence bucket, token budget, row filling.
        max_length: the model's longest input in tokens.
        lookahead: how many queued requests past the oldest are considered for one call; bounds the planner's
            work on a long queue.
    """

    max_texts: int
    max_padded_tokens: int | None
    batch_size: int | None
    policy: BatchPolicy
    max_length: int
    lookahead: int = 64

    def __post_init__(self) -> None:
        check_positive_int("max_texts", self.max_texts)
        check_positive_int("max_padded_tokens", self.max_padded_tokens, optional=True)
        check_positive_int("batch_size", self.batch_size, optional=True)
        check_positive_int("max_length", self.max_length)
        check_positive_int("lookahead", self.lookahead, minimum=0)

    def cost(self, lengths: Sequence[int]) -> int:
        """Padded token positions of one call on texts of these token counts."""
        return padded_tokens(lengths, self.policy, self.batch_size, max_length=self.max_length)


def plan_batch(queued: Sequence[Sequence[int]], budget: TokenBudget) -> list[int]:
    """Picks the requests of the next model call.

    Args:
        queued: per queued request, oldest first, the token count of each of its texts.
        budget: the call's limits.

    Returns:
        Positions in ``queued`` of the requests to merge, ascending; the oldest (0) always among them. Empty for
        an empty queue.
    """
    if not queued:
        return []
    chosen = [0]
    lengths = list(queued[0])
    if len(lengths) >= budget.max_texts or not _fits(lengths, budget):
        return chosen
    for position in range(1, min(len(queued), budget.lookahead + 1)):
        request = queued[position]
        if len(lengths) + len(request) > budget.max_texts:
            continue
        merged = lengths + list(request)
        if _fits(merged, budget):
            chosen.append(position)
            lengths = merged
            if len(lengths) == budget.max_texts:
                break
    return chosen


def _fits(lengths: list[int], budget: TokenBudget) -> bool:
    return budget.max_padded_tokens is None or budget.cost(lengths) <= budget.max_padded_tokens
