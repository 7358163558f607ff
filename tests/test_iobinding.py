"""The IO-binding path against the plain ``session.run`` path, buffer reuse and the token budget; and, marked
``gpu``, the same on the CUDA execution provider. CUDA graphs: ``test_cuda_graphs.py``; providers, their options
and load errors: ``test_cuda_providers.py``."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.batching import plan_batches
from deberta_onnx.runtime.iobinding import IOBindingRunner
from deberta_onnx.runtime.runners import SessionRunner

from .reference import reference_embeddings
from .runner_helpers import ragged_batch, sample_texts


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- CPU results


def test_runner_equals_plain_run_on_ragged_batches(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    plain = SessionRunner(encoder.session)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size)
    for seed, (rows, width) in enumerate([(1, None), (3, None), (7, 64), (16, None), (5, 512)]):
        input_ids, mask = ragged_batch(encoder, sample_texts(corpus, rows, seed), width)
        assert len(set(mask.sum(axis=1).tolist())) > 1 or rows == 1  # really ragged
        for _ in range(2):  # the second call goes through the reused buckets
            (expected,) = plain.run(input_ids, mask)
            (actual,) = runner.run(input_ids, mask)
            assert actual.dtype == np.float32 and actual.shape == (rows, encoder.hidden_size)
            np.testing.assert_array_equal(actual, expected)


def test_returned_vectors_are_not_overwritten_by_the_next_call(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size)
    first = ragged_batch(encoder, corpus[:4], 32)
    second = ragged_batch(encoder, corpus[4:8], 32)
    (a,) = runner.run(*first)
    kept = a.copy()
    (b,) = runner.run(*second)
    np.testing.assert_array_equal(a, kept)
    assert not np.allclose(a, b)


def test_padding_rows_and_columns_leave_real_rows_unchanged(tiny_model: Path, corpus: list[str]) -> None:
    """What a sequence bucket and a graph-filled batch do: extra padding columns, extra all-padding rows."""
    encoder = Encoder(tiny_model)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size)
    ids = encoder.loaded.tokenizer.encode(corpus[10:15])
    (tight,) = runner.run(*encoder.loaded.tokenizer.pad(ids))
    (bucketed,) = runner.run(*encoder.loaded.tokenizer.pad(ids, multiple_of=32))
    (filled,) = runner.run(*encoder.loaded.tokenizer.pad(ids + [[]] * 3, multiple_of=32))
    np.testing.assert_allclose(bucketed, tight, atol=1e-5, rtol=0)
    np.testing.assert_allclose(filled[:5], tight, atol=1e-5, rtol=0)


def test_encoder_io_binding_matches_plain_path_and_pytorch(exported: tuple[Path, Path], corpus: list[str]) -> None:
    checkpoint, folder = exported
    texts = sample_texts(corpus, 40, seed=4)
    plain = Encoder(folder).encode(texts, batch_size=8)
    bucketed_plain = Encoder(folder, config=EncoderConfig(sequence_bucket=16)).encode(texts, batch_size=8)
    bound = Encoder(folder, config=EncoderConfig(io_binding=True))
    assert isinstance(bound.loaded.runner, IOBindingRunner) and bound.loaded.policy.sequence_bucket == 16
    by_rows = bound.encode(texts, batch_size=8)
    by_tokens = Encoder(folder, config=EncoderConfig(io_binding=True, max_tokens=200)).encode(texts)
    # Same padded batches, same session kernels: the same bits.
    np.testing.assert_array_equal(by_rows, bucketed_plain)
    # Padding to a bucket, or batching by a token budget, changes only masked positions.
    np.testing.assert_allclose(by_rows, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(by_tokens, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(by_rows, reference_embeddings(checkpoint, texts), atol=1e-4, rtol=0)


def test_token_budget_batches_by_length(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model, config=EncoderConfig(io_binding=True, max_tokens=256, sequence_bucket=16))
    runner = encoder.loaded.runner
    assert isinstance(runner, IOBindingRunner)
    texts = corpus[:120]
    np.testing.assert_allclose(encoder.encode(texts), Encoder(tiny_model).encode(texts), atol=1e-5, rtol=0)
    for rows, width in runner.shapes():
        assert width % 16 == 0 and (rows * width <= 256 or rows == 1)
    # A batch_size passed to encode caps the rows as well.
    before = set(runner.shapes())
    encoder.encode(texts, batch_size=2)
    added = set(runner.shapes()) - before
    assert added and all(rows <= 2 for rows, _ in added)


def test_plan_batches_partitions_and_respects_limits() -> None:
    rng = np.random.default_rng(0)
    for case in range(300):
        lengths = sorted(rng.integers(0, 600, size=int(rng.integers(0, 80))).tolist(), reverse=True)
        batch_size = None if case % 3 == 0 else int(rng.integers(1, 41))
        max_tokens = None if case % 3 == 1 else int(rng.integers(1, 4000))
        multiple_of = int(rng.choice([1, 8, 16, 32]))
        batches = list(plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens,
                                    multiple_of=multiple_of, max_length=512))
        assert [i for b in batches for i in range(b.start, b.stop)] == list(range(len(lengths))), case
        for b in batches:
            rows = b.stop - b.start
            assert 1 <= rows <= b.capacity, case
            assert all(lengths[i] <= b.width for i in range(b.start, b.stop)), case
            assert b.width % multiple_of == 0 or b.width == max(512, lengths[b.start]), case
            assert batch_size is None or rows <= batch_size, case
            assert max_tokens is None or rows == 1 or rows * b.width <= max_tokens, case
        # Rows follow the width, and only the last batch may be short: one shape per width, plus one.
        assert len({(b.stop - b.start, b.width) for b in batches}) <= len({b.width for b in batches}) + 1, case


# ------------------------------------------------------------------------------------------- buffer reuse


@pytest.mark.slow
def test_buffers_are_reused_over_400_calls(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size, max_buckets=8)
    plain = SessionRunner(encoder.session)
    # Large enough that one leaked buffer set per call (64 KiB of ids at 32 x 128) would show in the RSS.
    shapes = [(1, 16), (4, 32), (8, 64), (16, 64), (32, 128), (3, 128)]
    rng = np.random.default_rng(0)

    def batch(rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        ids = rng.integers(5, 1000, size=(rows, width), dtype=np.int64)
        lengths = rng.integers(1, width + 1, size=rows)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return np.where(mask == 1, ids, encoder.loaded.tokenizer.pad_id), mask

    for _ in range(3):  # warm-up: buckets allocated, ONNX Runtime's arena grown to its working size
        for shape in shapes:
            runner.run(*batch(*shape))
    allocations = runner.allocations
    addresses = {shape: runner._buckets[shape].buffers() for shape in shapes}
    gc.collect()
    rss_before = _rss_bytes()
    for call in range(400):  # a leaked buffer set per call would be 25 MiB, three times the bound
        input_ids, mask = batch(*shapes[call % len(shapes)])
        (vectors,) = runner.run(input_ids, mask)
        if call % 97 == 0:
            np.testing.assert_array_equal(vectors, plain.run(input_ids, mask)[0])
    gc.collect()
    growth = _rss_bytes() - rss_before
    assert runner.allocations == allocations == len(shapes)
    assert runner.bucket_count == len(shapes)
    assert {shape: runner._buckets[shape].buffers() for shape in shapes} == addresses
    assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 400 calls"


@pytest.mark.slow
def test_lru_caps_buckets_however_many_shapes(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size, max_buckets=4)
    shapes = [(rows, width) for rows in (1, 2, 3, 5, 8) for width in (8, 16, 24, 32, 48, 64)]  # 30 shapes
    gc.collect()
    rss_first = None
    for call in range(1000):
        rows, width = shapes[call % len(shapes)]
        runner.run(np.full((rows, width), 7, dtype=np.int64), np.ones((rows, width), dtype=np.int64))
        assert runner.bucket_count <= 4
        if call == len(shapes) * 2:
            gc.collect()
            rss_first = _rss_bytes()
    assert runner.shapes()[-1] == shapes[999 % len(shapes)]  # most recently used last
    assert runner.allocations == 1000  # cycling 30 shapes through 4 slots: every call misses, nothing is kept
    gc.collect()
    assert rss_first is not None and _rss_bytes() - rss_first < 8 << 20


def test_runner_rejects_bad_arrays(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size)
    ones = np.ones((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="one shape"):
        runner.run(ones, np.ones((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        runner.run(ones[:0], ones[:0])
    with pytest.raises(TypeError, match="input_ids must hold integers"):
        runner.run(ones.astype(np.float32), ones)
    with pytest.raises(ValueError, match="max_buckets"):
        IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size, max_buckets=0)
    # int32 ids are widened, not reinterpreted byte for byte.
    np.testing.assert_array_equal(runner.run(ones.astype(np.int32), ones)[0], runner.run(ones, ones)[0])


# ------------------------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
def test_cuda_io_binding_equals_cpu(exported: tuple[Path, Path], corpus: list[str]) -> None:
    _, folder = exported
    texts = sample_texts(corpus, 64, seed=7)
    cpu = Encoder(folder).encode(texts)
    encoder = Encoder(folder, config=EncoderConfig(device="cuda"))
    assert encoder.session.get_providers()[0] == "CUDAExecutionProvider" and encoder.device == "cuda:0"
    assert isinstance(encoder.loaded.runner, IOBindingRunner) and encoder.loaded.runner.device == "cuda"
    bound = encoder.encode(texts, batch_size=16)
    plain = Encoder(folder, config=EncoderConfig(device="cuda", io_binding=False)).encode(texts, batch_size=16)
    # TF32 is off by default (use_tf32=False), so CUDA agrees with the CPU to fp32 rounding.
    np.testing.assert_allclose(bound, cpu, atol=1e-4, rtol=0)
    np.testing.assert_allclose(bound, plain, atol=1e-5, rtol=0)
    by_tokens = Encoder(folder, config=EncoderConfig(device="cuda", max_tokens=512)).encode(texts)
    np.testing.assert_allclose(by_tokens, cpu, atol=1e-4, rtol=0)
