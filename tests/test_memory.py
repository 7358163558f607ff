"""Bounded memory on the CPU: the default token budget (batches change, vectors do not), the CPU arena settings,
and memory that comes back after long texts, measured on a real server process."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.batching import ModelCall, call_memory, token_batches
from deberta_onnx.runtime.cli import main
from deberta_onnx.runtime.config import ARENA_CHOICES, DEFAULT_BATCH_SIZE, DEFAULT_CPU_MAX_TOKENS
from deberta_onnx.runtime.heap import fix_mmap_threshold
from deberta_onnx.runtime.runners import SessionRunner
from deberta_onnx.runtime.server import microbatch
from deberta_onnx.runtime.server.microbatch import MicroBatcher
from deberta_onnx.runtime.server.testing import ServerProcess

from .conftest import HARD_TEXTS
from .runner_helpers import burst_of_long_texts, long_text

# Long texts (cut at the tiny model's 512 tokens) among medium and short ones, in no particular order.
TEXTS = [long_text(n, i) for i, n in enumerate([700, 3, 150, 480, 12, 600, 40, 260, 5, 900, 75, 330, 8, 20])] * 5
TEXTS += HARD_TEXTS + [f"a short text, number {i}" for i in range(40)]


def test_the_cpu_gets_a_token_budget_by_default(tiny_model: Path) -> None:
    policy = Encoder(tiny_model).loaded.policy
    assert policy.max_tokens == DEFAULT_CPU_MAX_TOKENS and policy.default_rows == DEFAULT_BATCH_SIZE
    # Past 512 tokens, no more attention scores per call than 8 texts of 512 (test_attention.py runs 2048).
    assert policy.max_call_bytes == call_memory(8, 512, policy.heads) < 8192 << 20
    unbounded = Encoder(tiny_model, config=EncoderConfig(max_tokens=None)).loaded.policy
    assert unbounded.max_tokens is None and unbounded.max_call_bytes == 8192 << 20  # max_call_memory_mb alone
    explicit = Encoder(tiny_model, config=EncoderConfig(max_tokens=1000)).loaded.policy
    assert explicit.max_tokens == 1000 and explicit.default_rows is None  # a caller's budget alone sets the rows


@pytest.mark.slow
def test_the_default_budget_changes_batches_not_vectors(tiny_model: Path) -> None:
    default = Encoder(tiny_model)
    plain = Encoder(tiny_model, config=EncoderConfig(max_tokens=None, cpu_arena="next-power-of-two",
                                                     arena_shrink_tokens=None))
    loaded = default.loaded
    batches = list(token_batches(loaded.tokenizer, TEXTS, loaded.policy, None, truncate=True))
    assert all(batch.input_ids.size <= DEFAULT_CPU_MAX_TOKENS for batch in batches)
    assert max(len(batch.rows) for batch in batches) == DEFAULT_BATCH_SIZE  # short texts: still 32 rows a call
    # Full-length texts, longest first: as many as fit the budget.
    assert batches[0].input_ids.shape == (DEFAULT_CPU_MAX_TOKENS // loaded.max_length, loaded.max_length)
    np.testing.assert_allclose(default.encode(TEXTS), plain.encode(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(default.encode(TEXTS, batch_size=3), plain.encode(TEXTS), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("io_binding", [False, True])
def test_arena_settings_and_shrinking_give_the_same_vectors(tiny_model: Path, io_binding: bool) -> None:
    reference = Encoder(tiny_model, config=EncoderConfig(max_tokens=None, cpu_arena="next-power-of-two",
                                                         arena_shrink_tokens=None)).encode(TEXTS)
    # Each arena once, shrinking after every call, after long calls only, and never.
    for arena, shrink in zip(ARENA_CHOICES, (1, 2048, None)):
        config = EncoderConfig(cpu_arena=arena, arena_shrink_tokens=shrink, io_binding=io_binding)
        np.testing.assert_allclose(Encoder(tiny_model, config=config).encode(TEXTS), reference, atol=1e-5,
                                   rtol=0, err_msg=f"cpu_arena={arena} arena_shrink_tokens={shrink}")


def test_a_shrinking_call_returns_arrays_of_its_own(tiny_model: Path) -> None:
    # session.run's arrays are views of arena chunks: one kept alive at the end of a shrinking run would keep its
    # whole region. A shrinking call writes into arrays it owns instead, with the same values.
    encoder = Encoder(tiny_model)
    session, loaded = encoder.session, encoder.loaded
    batch = next(token_batches(loaded.tokenizer, TEXTS, loaded.policy, None, truncate=True))
    (viewed,) = SessionRunner(session).run(batch.input_ids, batch.attention_mask)
    (owned,) = SessionRunner(session, shrink_tokens=1).run(batch.input_ids, batch.attention_mask)
    assert not viewed.flags.owndata and owned.flags.owndata
    assert owned.shape == viewed.shape == (batch.input_ids.shape[0], viewed.shape[1])
    np.testing.assert_array_equal(owned, viewed)


def test_the_batcher_trims_the_heap_once_its_queue_empties_after_a_long_call(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = Encoder(tiny_model)
    calls_run: list[ModelCall] = []
    trimmed_after: list[int] = []  # how many calls had run at each trim
    monkeypatch.setattr(microbatch, "release_free_heap", lambda: trimmed_after.append(len(calls_run)) or True)

    def plan(texts: list[str]) -> Iterator[ModelCall]:
        for call in encoder.plan(texts):
            calls_run.append(call)
            yield call

    async def scenario(texts: list[str]) -> None:
        batcher = MicroBatcher(plan, max_batch_size=8, max_wait_s=0.01, max_queue=64, release_tokens=2048)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.submit([text]) for text in texts))
            await asyncio.sleep(0.2)  # the queue is empty: the worker trims, then waits
        finally:
            await batcher.close()

    asyncio.run(scenario(["short", "texts", "only"]))
    assert calls_run and trimmed_after == []  # no call of 2048 padded tokens: nothing to hand back
    asyncio.run(scenario([long_text(700, seed) for seed in range(6)]))  # 6 x 512 tokens
    assert max(call.padded_tokens for call in calls_run) >= 2048
    assert trimmed_after == [len(calls_run)]  # once, after the last call


def test_the_mmap_threshold_is_fixed_unless_the_user_set_malloc_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not fix_mmap_threshold()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert fix_mmap_threshold() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize(("fields", "says"), [
    ({"max_tokens": "lots"}, "max_tokens must be a positive int, 'auto' or None"),
    ({"max_tokens": 0}, "max_tokens must be a positive int"),
    ({"cpu_arena": "huge"}, "cpu_arena must be one of same-as-requested, next-power-of-two, off"),
    ({"arena_shrink_tokens": 0}, "arena_shrink_tokens must be a positive int or None"),
])
def test_memory_settings_are_checked(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        EncoderConfig(**fields)  # type: ignore[arg-type]


def test_cli_memory_flags_reach_the_config(tiny_model: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:12]), encoding="utf-8")
    args = ["embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy")]
    expected = Encoder(tiny_model).encode(TEXTS[:12])
    for flags in (["--max-tokens", "none", "--cpu-arena", "off", "--arena-shrink-tokens", "none"],
                  ["--max-tokens", "auto", "--cpu-arena", "next-power-of-two", "--arena-shrink-tokens", "100"],
                  ["--max-tokens", "600"]):
        assert main([*args, *flags]) == 0, flags
        np.testing.assert_allclose(np.load(tmp_path / "o.npy"), expected, atol=1e-5, rtol=0)
    with pytest.raises(SystemExit):
        main([*args, "--max-tokens", "lots"])
    assert "expected an integer, 'auto' or 'none'" in capsys.readouterr().err


def _rss_after_a_burst(model: Path, *flags: str) -> tuple[float, float, float]:
    """(RSS before, highest RSS seen during, RSS after) a burst of 512-token requests, in MB, of a real
    ``deberta-onnx serve`` process that served short requests first."""
    short = {"input": ["a short text", "and another one"]}
    with ServerProcess(model, "--threads", "1", *flags) as server:
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        for _ in range(5):
            assert httpx.post(f"{server.url}/v1/embeddings", json=short, timeout=120).status_code == 200
        before = process.memory_info().rss
        peak = burst_of_long_texts(server.url, process)
        after = process.memory_info().rss
    return before / 2**20, peak / 2**20, after / 2**20


@pytest.mark.slow
def test_a_servers_memory_comes_back_after_a_burst_of_long_texts(tiny_model: Path) -> None:
    before, peak, after = _rss_after_a_burst(tiny_model)
    assert peak > 2 * before, (before, peak, after)  # the burst did need memory
    assert after <= 1.25 * before, (before, peak, after)
    # Without shrinking, ONNX Runtime's arena keeps the burst's peak: what the test above would catch.
    kept_before, _, kept_after = _rss_after_a_burst(tiny_model, "--cpu-arena", "next-power-of-two",
                                                    "--arena-shrink-tokens", "none")
    assert kept_after > 2 * kept_before, (kept_before, kept_after)
