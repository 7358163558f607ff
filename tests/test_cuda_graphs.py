"""CUDA-graph bookkeeping of the IO-binding runner, tested on CPU sessions (which ignore ``gpu_graph_id``): graph
ids pinned to their shape and buffers, the replay guard, the eager fallback of a failing graph run, the one thread
graph runs go through, and the row counts short batches are filled to; and, marked ``gpu``, replays on CUDA."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.batching import BatchPolicy, filled_rows, token_batches
from deberta_onnx.runtime.errors import CudaGraphError
from deberta_onnx.runtime.iobinding import EAGER_GRAPH_ID, CudaGraphRegistry, IOBindingRunner
from deberta_onnx.runtime.runners import SessionRunner

from .runner_helpers import RecordingSession, WarningRecords, ragged_batch, sample_texts


def test_graph_registry_refuses_another_shape_or_buffer() -> None:
    registry = CudaGraphRegistry(limit=2)
    first = registry.register((8, 32), (0x1000, 0x2000))
    registry.check(first, (8, 32), (0x1000, 0x2000))
    replay = r"captured for shape \(8, 32\).*refusing to replay it for shape \(8, 48\)"
    with pytest.raises(CudaGraphError, match=replay):
        registry.check(first, (8, 48), (0x1000, 0x2000))
    with pytest.raises(CudaGraphError, match="captured for shape"):
        registry.check(first, (8, 32), (0x1000, 0x3000))
    with pytest.raises(CudaGraphError, match="never registered"):
        registry.check(first + 100, (8, 32), (0x1000, 0x2000))
    with pytest.raises(CudaGraphError, match="already has CUDA graph"):
        registry.register((8, 32), (0x5000, 0x6000))
    second = registry.register((1, 16), (0x7000, 0x8000))
    assert second != first and 0 not in (first, second)  # 0 is ONNX Runtime's default id
    assert not registry.has_room()
    with pytest.raises(CudaGraphError, match="all 2 CUDA graph ids are taken"):
        registry.register((2, 16), (0x9000, 0xA000))


def test_graph_ids_stay_with_their_shape_and_buffers(tiny_model: Path, corpus: list[str]) -> None:
    """The CUDA-graph bookkeeping on a CPU session, which ignores ``gpu_graph_id``: the ids each run asks for
    are recorded with the output it wrote."""
    encoder = Encoder(tiny_model)
    recording = RecordingSession(encoder.session)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, max_buckets=3, cuda_graph=True)  # type: ignore[arg-type]
    plain = SessionRunner(encoder.session)
    rng = np.random.default_rng(1)
    shapes = [(2, 16), (4, 32), (1, 16), (3, 48), (5, 16), (2, 32)]
    for _ in range(300):
        rows, width = shapes[rng.integers(len(shapes))]
        input_ids, mask = ragged_batch(encoder, sample_texts(corpus, rows, int(rng.integers(1 << 30))), width)
        input_ids, mask = input_ids[:, :width], mask[:, :width]
        np.testing.assert_array_equal(runner.run(input_ids, mask)[0], plain.run(input_ids, mask)[0])
    seen: dict[int, set[tuple[tuple[int, ...], int]]] = {}
    for graph_id, shape, address in recording.calls:
        assert graph_id is not None
        seen.setdefault(graph_id, set()).add((shape, address))
    graph_ids = sorted(g for g in seen if g != -1)
    assert len(graph_ids) == 3 and 0 not in graph_ids
    for graph_id in graph_ids:
        assert len(seen[graph_id]) == 1, f"graph {graph_id} saw {seen[graph_id]}"
    assert -1 in seen  # shapes beyond the three graphs ran eagerly
    assert runner.bucket_count <= 3 + 3


def test_graph_guard_stops_a_replay_before_it_runs(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    recording = RecordingSession(encoder.session)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    ids, mask = np.full((2, 16), 9, dtype=np.int64), np.ones((2, 16), dtype=np.int64)
    runner.run(ids, mask)
    # Swap the output buffer of the bucket whose graph is captured: a replay would write the old address.
    bucket = runner._pinned[(2, 16)]
    bucket.output = ort.OrtValue.ortvalue_from_shape_and_type([2, encoder.hidden_size], np.float32, "cpu", 0)
    calls = len(recording.calls)
    with pytest.raises(CudaGraphError, match=r"captured for shape \(2, 16\)"):
        runner.run(ids, mask)
    assert len(recording.calls) == calls


def test_a_failing_graph_run_gives_its_shape_up_to_eager_runs_once(tiny_model: Path, corpus: list[str]) -> None:
    """A capture that fails on a shape's first run must not leave the shape pinned to its graph id: the call
    is run again eagerly, the shape stays eager, the log says so once, and other shapes keep their graphs."""
    encoder = Encoder(tiny_model)
    recording = RecordingSession(encoder.session, failing={1})  # the first shape's graph id
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    plain = SessionRunner(encoder.session)
    records = WarningRecords()
    logging.getLogger("deberta_onnx").addHandler(records)
    try:
        first = ragged_batch(encoder, corpus[:2], 16)
        second = ragged_batch(encoder, corpus[2:6], 32)
        for batch in (first, second, first, second, first):
            np.testing.assert_array_equal(runner.run(*batch)[0], plain.run(*batch)[0])
    finally:
        logging.getLogger("deberta_onnx").removeHandler(records)
    assert runner.eager_shapes == {first[0].shape}
    assert [m for m in records.messages if "CUDA graph 1" in m] == [records.messages[0]] and len(records.messages) == 1
    assert "runs without a CUDA graph" in records.messages[0] and str(first[0].shape) in records.messages[0]
    ids_by_shape: dict[tuple[int, ...], set[int | None]] = {}
    for graph_id, shape, _ in recording.calls:
        ids_by_shape.setdefault(shape, set()).add(graph_id)
    assert ids_by_shape[(2, encoder.hidden_size)] == {EAGER_GRAPH_ID}  # every successful run of it was eager
    assert ids_by_shape[(4, encoder.hidden_size)] == {2}  # the other shape kept its graph
    assert runner.graphs is not None and len(runner.graphs) == 1
    # Freed and allocated again (an LRU eviction), the shape still runs eagerly.
    runner._buckets.pop(first[0].shape)
    np.testing.assert_array_equal(runner.run(*first)[0], plain.run(*first)[0])
    assert recording.calls[-1][0] == EAGER_GRAPH_ID and len(runner.graphs) == 1


def test_a_graph_run_whose_eager_retry_fails_raises_a_named_error(tiny_model: Path) -> None:
    encoder = Encoder(tiny_model)
    recording = RecordingSession(encoder.session, failing={1}, eager_fails=True)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    ids, mask = np.full((2, 16), 9, dtype=np.int64), np.ones((2, 16), dtype=np.int64)
    with pytest.raises(CudaGraphError, match=r"CUDA graph 1 for shape \(2, 16\) failed .*eager run after it failed "
                                             r"too .*without cuda_graph"):
        runner.run(ids, mask)


def test_graph_runs_happen_on_one_thread_whoever_calls(tiny_model: Path, corpus: list[str]) -> None:
    """ONNX Runtime keeps captured CUDA graphs per thread: every run goes through the runner's own thread."""
    encoder = Encoder(tiny_model)
    recording = RecordingSession(encoder.session)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    plain = SessionRunner(encoder.session)
    batches = [ragged_batch(encoder, corpus[i: i + rows], width)
               for i, (rows, width) in enumerate([(1, 16), (2, 32), (4, 32), (3, 48)])]
    expected = [plain.run(*batch)[0] for batch in batches]
    callers: set[int] = set()

    def work(seed: int) -> None:
        callers.add(threading.get_ident())
        for call in range(25):
            index = (seed + call) % len(batches)
            np.testing.assert_array_equal(runner.run(*batches[index])[0], expected[index])

    with ThreadPoolExecutor(max_workers=8) as pool:
        for done in [pool.submit(work, seed) for seed in range(8)]:
            done.result()  # re-raises a failed assertion here
    assert len(recording.calls) == 200 and len(set(recording.threads)) == 1
    assert not set(recording.threads) & (callers | {threading.get_ident()})


def test_short_batches_are_filled_to_a_power_of_two() -> None:
    assert [filled_rows(rows, 32) for rows in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert [filled_rows(rows, 24) for rows in (1, 5, 17, 24)] == [1, 8, 24, 24]
    assert {filled_rows(rows, 32) for rows in range(1, 33)} == {1, 2, 4, 8, 16, 32}  # six graphs per width at most
    for bad in (0, 33):
        with pytest.raises(ValueError, match="between 1 and the capacity 32"):
            filled_rows(bad, 32)


def test_filled_batches_keep_few_shapes_and_only_real_rows(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    tokenizer = encoder.loaded.tokenizer
    policy = BatchPolicy(sequence_bucket=16, fill_rows=True)
    for count, batch_size, rows in ((1, 32, [1]), (5, 32, [8]), (17, 32, [32]), (17, 24, [24]), (40, 32, [32, 8])):
        batches = list(token_batches(tokenizer, corpus[:count], policy, batch_size, truncate=True))
        assert [b.input_ids.shape[0] for b in batches] == rows, (count, batch_size)
        assert sum(len(b.rows) for b in batches) == count
        for b in batches:
            assert b.input_ids.shape[1] % 16 == 0
            assert (b.attention_mask[len(b.rows):] == 0).all() and (b.attention_mask[: len(b.rows)].sum(1) > 0).all()
    # The padding rows change no real row's vector.
    texts = corpus[:5]
    (filled,) = (b for b in token_batches(tokenizer, texts, policy, 32, truncate=True))
    vectors = SessionRunner(encoder.session).run(filled.input_ids, filled.attention_mask)[0][: len(texts)]
    np.testing.assert_allclose(vectors[np.argsort(filled.rows)], encoder.encode(texts), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(tiny_model: Path, corpus: list[str]) -> None:
    eager = Encoder(tiny_model, config=EncoderConfig(device="cuda"))
    graphed = Encoder(tiny_model, config=EncoderConfig(device="cuda", cuda_graph=True))
    runner = graphed.loaded.runner
    assert isinstance(runner, IOBindingRunner) and runner.graphs is not None
    # Two sets of texts with the same batch shapes: a replay must read the new inputs, not the captured ones.
    first, second = corpus[:48], corpus[48:96]
    for texts in (first, second, first, second, first):  # capture happens after ONNX Runtime's warm-up runs
        np.testing.assert_allclose(graphed.encode(texts, batch_size=16), eager.encode(texts, batch_size=16),
                                   atol=1e-5, rtol=0)
    assert len(runner.graphs) >= 1
    # A short batch is filled to the next power of two: five texts run an 8-row graph, one text a 1-row graph.
    for count in (5, 1):
        np.testing.assert_allclose(graphed.encode(first[:count], batch_size=16),
                                   eager.encode(first[:count], batch_size=16), atol=1e-5, rtol=0)
    assert {rows for rows, _ in runner.shapes()} <= {1, 2, 4, 8, 16} and {1, 8} <= {r for r, _ in runner.shapes()}
    assert not runner.eager_shapes  # every capture worked
