"""Token-budget planning (runtime/server/budget.py) on hand-built token counts, and the padded cost it plans with
(batching.padded_tokens) against the batches token_batches really builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.batching import BatchPolicy, padded_tokens, token_batches
from deberta_onnx.runtime.server.budget import TokenBudget, plan_batch

PLAIN = BatchPolicy()


def _budget(**kw: object) -> TokenBudget:
    settings: dict = {"max_texts": 32, "max_padded_tokens": 256, "batch_size": 8, "policy": PLAIN,  # type: ignore[type-arg]
                      "max_length": 512, **kw}
    return TokenBudget(**settings)


@pytest.mark.parametrize("policy", [BatchPolicy(), BatchPolicy(sequence_bucket=8),
                                    BatchPolicy(max_tokens=64, sequence_bucket=4),
                                    BatchPolicy(sequence_bucket=16, fill_rows=True)])
@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_padded_tokens_is_what_token_batches_runs(tiny_model: Path, corpus: list[str], policy: BatchPolicy,
                                                  batch_size: int | None) -> None:
    loaded = Encoder(tiny_model).loaded
    texts = [corpus[i] * (1 + i % 5) for i in range(37)] + ["", "x" * 2000]
    ran = sum(b.input_ids.size for b in token_batches(loaded.tokenizer, texts, policy, batch_size, truncate=True))
    lengths = [len(ids) for ids in loaded.tokenizer.encode(texts)]
    assert padded_tokens(lengths, policy, batch_size, max_length=loaded.tokenizer.max_length) == ran
    shuffled = list(np.random.default_rng(0).permutation(lengths))
    assert padded_tokens(shuffled, policy, batch_size, max_length=loaded.tokenizer.max_length) == ran


def test_padded_tokens_by_hand() -> None:
    # Sorted 10, 9, 3, 2, 2: rows of 2 -> widths 10, 3, 2 -> 20 + 6 + 2.
    assert padded_tokens([2, 10, 3, 9, 2], PLAIN, 2, max_length=512) == 28
    # Bucket 4: widths 12, 4, 4 -> 24 + 8 + 4; filled rows pad a short batch to the next power of two, so the
    # last batch's one row stays one row.
    assert padded_tokens([2, 10, 3, 9, 2], BatchPolicy(sequence_bucket=4), 2, max_length=512) == 36
    assert padded_tokens([2, 10, 3, 9, 2], BatchPolicy(sequence_bucket=4, fill_rows=True), 2, max_length=512) == 36
    # Rows of 4, sorted 10, 9, 7, 5 | 3, 2, 2: widths 12 and 4; filled, the last batch's 3 rows count 4.
    seven = [2, 10, 3, 9, 2, 5, 7]
    assert padded_tokens(seven, BatchPolicy(sequence_bucket=4), 4, max_length=512) == 48 + 12
    assert padded_tokens(seven, BatchPolicy(sequence_bucket=4, fill_rows=True), 4, max_length=512) == 48 + 16
    # A token budget of 20: width 10 holds 2 rows, width 3 holds 6.
    assert padded_tokens([2, 10, 3, 9, 2], BatchPolicy(max_tokens=20), None, max_length=512) == 20 + 9
    assert padded_tokens([], PLAIN, 8, max_length=512) == 0


def test_short_requests_pass_a_long_one() -> None:
    # Three short requests, one long one queued second: the long one would pad its row-mates to 200 tokens.
    queued = [[10, 12], [200, 190], [11], [9, 10, 12]]
    budget = _budget(max_padded_tokens=128, batch_size=8)
    assert plan_batch(queued, budget) == [0, 2, 3]
    # On its own the long request leads the next call.
    assert plan_batch([queued[1]], budget) == [0]


def test_the_oldest_request_is_always_taken() -> None:
    over = [[500] * 4, [5]]
    assert plan_batch(over, _budget(max_padded_tokens=100)) == [0]
    assert plan_batch([[5] * 40, [5]], _budget(max_texts=32)) == [0]
    assert plan_batch([], _budget()) == []


def test_texts_limit_and_whole_requests() -> None:
    queued = [[4] * 10, [4] * 15, [4] * 10, [4] * 7]
    # 10 + 15 = 25; the next 10 would pass 32 texts, the 7 fit exactly.
    assert plan_batch(queued, _budget(max_texts=32, max_padded_tokens=None)) == [0, 1, 3]
    chosen = plan_batch(queued, _budget(max_texts=32, max_padded_tokens=None))
    assert sum(len(queued[i]) for i in chosen) == 32


def test_budget_counts_padding_as_the_call_pads() -> None:
    # Rows of 4: [30, 3, 3, 3] pads three short rows to 30 (120 positions); in separate rows-of-4 groups they
    # would cost far less. The planner sees the padded cost, not the sum of lengths (39).
    budget = _budget(max_padded_tokens=100, batch_size=4)
    assert budget.cost([30, 3, 3, 3]) == 120
    assert plan_batch([[30], [3, 3, 3]], budget) == [0]
    # Run one row at a time, nothing is padded: the same requests fit.
    assert plan_batch([[30], [3, 3, 3]], _budget(max_padded_tokens=100, batch_size=1)) == [0, 1]


def test_lookahead_bounds_the_scan() -> None:
    queued = [[100]] + [[100]] * 10 + [[1]]
    assert plan_batch(queued, _budget(max_padded_tokens=150, batch_size=1, lookahead=5)) == [0]
    assert plan_batch(queued, _budget(max_padded_tokens=150, batch_size=1, lookahead=20)) == [0, 11]


@pytest.mark.parametrize(("field", "value"), [("max_texts", 0), ("max_padded_tokens", 0), ("batch_size", -1),
                                              ("lookahead", -1), ("max_length", True)])
def test_bad_budgets_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        _budget(**{field: value})


def test_the_batcher_keeps_a_long_request_out_of_the_short_ones_batch(tiny_model: Path) -> None:
    """The micro-batcher with a token budget, on the real encoder: a long request queued first runs alone, the
    short ones queued behind it are merged into the next batch, and every vector is the encoder's."""
    import asyncio
    from typing import Any

    from deberta_onnx.runtime.server.microbatch import MicroBatcher

    encoder = Encoder(tiny_model)
    long_text, shorts = "a long text " * 40, [["one"], ["two", "three"]]
    every = [long_text, "one", "two", "three"]
    lengths = dict(zip(every, encoder.token_count(every)))
    merged: list[list[str]] = []

    def plan(texts: list[str]) -> Any:
        merged.append(list(texts))
        return encoder.plan(texts, 8)

    budget = TokenBudget(max_texts=32, max_padded_tokens=lengths[long_text], batch_size=8,
                         policy=encoder.loaded.policy, max_length=encoder.max_length)

    async def scenario() -> list[Any]:
        batcher = MicroBatcher(plan, max_batch_size=32, max_wait_s=0.05, max_queue=64, budget=budget)
        batcher.start()
        try:
            requests = [[long_text], *shorts]
            calls = [batcher.submit(texts, [lengths[t] for t in texts]) for texts in requests]
            answers = await asyncio.gather(*calls)
            with pytest.raises(ValueError, match="token count per input"):
                await batcher.submit(["one"])
            return answers
        finally:
            await batcher.close()

    answers = asyncio.run(scenario())
    assert merged == [[long_text], ["one", "two", "three"]]
    for (vectors, _), texts in zip(answers, [[long_text], *shorts]):
        np.testing.assert_allclose(vectors, encoder.encode(texts), atol=1e-6, rtol=0)
