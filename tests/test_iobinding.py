"""The IO-binding path against the plain ``session.run`` path, buffer reuse, the CUDA-graph guard, provider
errors; and, marked ``gpu``, the same on the CUDA execution provider."""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.batching import BatchPolicy, filled_rows, plan_batches, token_batches
from deberta_onnx.runtime.cli import build_parser, main
from deberta_onnx.runtime.cli.common import load
from deberta_onnx.runtime.errors import (
    CudaGraphError,
    ModelFolderError,
    ModelLoadError,
    ProviderUnavailableError,
)
from deberta_onnx.runtime.iobinding import EAGER_GRAPH_ID, GRAPH_ID_OPTION, CudaGraphRegistry, IOBindingRunner
from deberta_onnx.runtime.runners import SessionRunner
from deberta_onnx.runtime.session import (
    CudaSettings,
    SessionSettings,
    create_session,
    load_error,
    resolve_providers,
)

from .conftest import HARD_TEXTS
from .reference import reference_embeddings


def _texts(corpus: list[str], count: int, seed: int) -> list[str]:
    pool = HARD_TEXTS + corpus
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def _ragged_batch(encoder: Encoder, texts: list[str], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real token ids for ``texts``, right-padded (to ``width`` when given): rows of different lengths."""
    ids = encoder.loaded.tokenizer.encode(texts)
    input_ids, mask = encoder.loaded.tokenizer.pad(ids)
    if width is not None and width > input_ids.shape[1]:
        extra = width - input_ids.shape[1]
        input_ids = np.pad(input_ids, ((0, 0), (0, extra)), constant_values=encoder.loaded.tokenizer.pad_id)
        mask = np.pad(mask, ((0, 0), (0, extra)))
    return input_ids, mask


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RecordingSession:
    """A real session that records, per ``run_with_iobinding``, the graph id asked for and the output it wrote,
    and the thread it ran on. Runs with a graph id in ``failing`` raise ONNX Runtime's own ``Fail`` instead (as a
    capture that does not work for a shape would); with ``eager_fails``, eager runs do too."""

    def __init__(self, session: ort.InferenceSession, failing: set[int] | None = None,
                 eager_fails: bool = False) -> None:
        self._session = session
        self.calls: list[tuple[int | None, tuple[int, ...], int]] = []
        self.threads: list[int] = []
        self.failing = failing or set()
        self.eager_fails = eager_fails

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run_with_iobinding(self, binding: ort.IOBinding, run_options: ort.RunOptions | None = None) -> None:
        graph_id = None if run_options is None else int(run_options.get_run_config_entry(GRAPH_ID_OPTION))
        self.threads.append(threading.get_ident())
        if graph_id in self.failing or (self.eager_fails and graph_id == EAGER_GRAPH_ID):
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail

            raise Fail(f"[ONNXRuntimeError] : 1 : FAIL : CUDA failure 900: operation not permitted when stream is "
                       f"capturing (graph {graph_id})")
        self._session.run_with_iobinding(binding, run_options)
        (output,) = binding.get_outputs()
        self.calls.append((graph_id, tuple(output.shape()), output.data_ptr()))


class _Records(logging.Handler):
    """Collects the records of the runtime's logger (works with pytest's logging plugin off, too)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------------------------- CPU results


def test_runner_equals_plain_run_on_ragged_batches(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    plain = SessionRunner(encoder.session)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size)
    for seed, (rows, width) in enumerate([(1, None), (3, None), (7, 64), (16, None), (5, 512)]):
        input_ids, mask = _ragged_batch(encoder, _texts(corpus, rows, seed), width)
        assert len(set(mask.sum(axis=1).tolist())) > 1 or rows == 1  # really ragged
        for _ in range(2):  # the second call goes through the reused buckets
            (expected,) = plain.run(input_ids, mask)
            (actual,) = runner.run(input_ids, mask)
            assert actual.dtype == np.float32 and actual.shape == (rows, encoder.hidden_size)
            np.testing.assert_array_equal(actual, expected)


def test_returned_vectors_are_not_overwritten_by_the_next_call(tiny_model: Path, corpus: list[str]) -> None:
    encoder = Encoder(tiny_model)
    runner = IOBindingRunner(encoder.session, hidden_size=encoder.hidden_size)
    first = _ragged_batch(encoder, corpus[:4], 32)
    second = _ragged_batch(encoder, corpus[4:8], 32)
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
    texts = _texts(corpus, 40, seed=4)
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


def test_buffers_are_reused_over_1000_calls(tiny_model: Path, corpus: list[str]) -> None:
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
    for call in range(1000):
        input_ids, mask = batch(*shapes[call % len(shapes)])
        (vectors,) = runner.run(input_ids, mask)
        if call % 97 == 0:
            np.testing.assert_array_equal(vectors, plain.run(input_ids, mask)[0])
    gc.collect()
    growth = _rss_bytes() - rss_before
    assert runner.allocations == allocations == len(shapes)
    assert runner.bucket_count == len(shapes)
    assert {shape: runner._buckets[shape].buffers() for shape in shapes} == addresses
    assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 1,000 calls"


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


# ------------------------------------------------------------------------------------- CUDA graph guard


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
    recording = _RecordingSession(encoder.session)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, max_buckets=3, cuda_graph=True)  # type: ignore[arg-type]
    plain = SessionRunner(encoder.session)
    rng = np.random.default_rng(1)
    shapes = [(2, 16), (4, 32), (1, 16), (3, 48), (5, 16), (2, 32)]
    for _ in range(300):
        rows, width = shapes[rng.integers(len(shapes))]
        input_ids, mask = _ragged_batch(encoder, _texts(corpus, rows, int(rng.integers(1 << 30))), width)
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
    recording = _RecordingSession(encoder.session)
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
    recording = _RecordingSession(encoder.session, failing={1})  # the first shape's graph id
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    plain = SessionRunner(encoder.session)
    records = _Records()
    logging.getLogger("deberta_onnx").addHandler(records)
    try:
        first = _ragged_batch(encoder, corpus[:2], 16)
        second = _ragged_batch(encoder, corpus[2:6], 32)
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
    recording = _RecordingSession(encoder.session, failing={1}, eager_fails=True)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    ids, mask = np.full((2, 16), 9, dtype=np.int64), np.ones((2, 16), dtype=np.int64)
    with pytest.raises(CudaGraphError, match=r"CUDA graph 1 for shape \(2, 16\) failed .*eager run after it failed "
                                             r"too .*without cuda_graph"):
        runner.run(ids, mask)


def test_graph_runs_happen_on_one_thread_whoever_calls(tiny_model: Path, corpus: list[str]) -> None:
    """ONNX Runtime keeps captured CUDA graphs per thread: every run goes through the runner's own thread."""
    encoder = Encoder(tiny_model)
    recording = _RecordingSession(encoder.session)
    runner = IOBindingRunner(recording, hidden_size=encoder.hidden_size, cuda_graph=True)  # type: ignore[arg-type]
    plain = SessionRunner(encoder.session)
    batches = [_ragged_batch(encoder, corpus[i: i + rows], width)
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


# ----------------------------------------------------------------------------------- providers and config


def test_cuda_request_names_the_gpu_package(tiny_model: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here")
    with pytest.raises(ProviderUnavailableError) as caught:
        Encoder(tiny_model, config=EncoderConfig(device="cuda"))
    message = str(caught.value)
    assert "CUDAExecutionProvider is not available" in message
    assert "deberta-onnx[gpu]" in message and "onnxruntime-gpu" in message
    assert "must not be installed at once" in message


def test_both_onnxruntime_packages_installed_is_named(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here")
    real_version = importlib.metadata.version
    fake = {"onnxruntime": ort.__version__, "onnxruntime-gpu": ort.__version__}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real_version(name))
    with pytest.raises(ProviderUnavailableError, match=r"Both onnxruntime \S+ and onnxruntime-gpu \S+ are installed"):
        Encoder(tiny_model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_silent_fallback_to_cpu_is_refused(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim CUDA is installed: ONNX Runtime then really makes a CPU-only session, which must be refused."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here")
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real(), "CUDAExecutionProvider"])
    with pytest.warns(UserWarning), pytest.raises(ProviderUnavailableError) as caught:
        create_session(tiny_model / "model.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], SessionSettings())
    message = str(caught.value)
    assert "without CUDAExecutionProvider (active: CPUExecutionProvider)" in message
    assert "deberta-onnx[gpu]" in message


def test_device_and_cuda_graph_arguments_are_checked(tiny_model: Path) -> None:
    assert resolve_providers(None, "cuda:1") == [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"}),
                                                 "CPUExecutionProvider"]
    # With CUDA graphs the arena grows by what is asked for, as ONNX Runtime's own CUDA-graph helper sets it.
    assert resolve_providers(None, "cuda", cuda_graph=True)[0] == ("CUDAExecutionProvider", {
        "device_id": "0", "enable_cuda_graph": "1", "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"})
    assert resolve_providers(None, None) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not both"):
        resolve_providers(["CPUExecutionProvider"], "cpu")
    with pytest.raises(ValueError, match="cuda_graph needs CUDAExecutionProvider"):
        Encoder(tiny_model, config=EncoderConfig(cuda_graph=True))
    with pytest.raises(ValueError, match="device must be"):
        EncoderConfig(device="gpu")
    with pytest.raises(ValueError, match="cuda_graph needs io_binding"):
        EncoderConfig(cuda_graph=True, io_binding=False)
    for field in ("sequence_bucket", "max_tokens", "max_buckets"):
        with pytest.raises(ValueError, match=field):
            EncoderConfig(**{field: 0})
    with pytest.raises(ValueError, match="batch_size"):
        Encoder(tiny_model).encode(["a"], batch_size=0)


def test_cuda_provider_options_come_from_the_config() -> None:
    def cuda_options(**fields: object) -> object:
        config = EncoderConfig(device="cuda", **fields)  # type: ignore[arg-type]
        return resolve_providers(None, config.device, cuda=CudaSettings.from_config(config))[0]

    assert cuda_options() == ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})  # TF32 off by default
    assert cuda_options(use_tf32=True, gpu_mem_limit=8 << 30, cuda_arena_extend_strategy="kNextPowerOfTwo") == (
        "CUDAExecutionProvider", {"device_id": "0", "use_tf32": "1", "gpu_mem_limit": str(8 << 30),
                                  "arena_extend_strategy": "kNextPowerOfTwo"})
    # An explicit strategy wins over the CUDA-graph default; options given with the provider win over the config.
    settings = CudaSettings(arena_extend_strategy="kNextPowerOfTwo", cuda_graph=True)
    assert resolve_providers(None, "cuda", cuda=settings)[0][1]["arena_extend_strategy"] == "kNextPowerOfTwo"
    given = [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1"}), "CPUExecutionProvider"]
    assert resolve_providers(given, None, cuda=CudaSettings(gpu_mem_limit=1024)) == [
        ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1", "gpu_mem_limit": "1024"}), "CPUExecutionProvider"]
    cpu_only = ["CPUExecutionProvider"]
    assert resolve_providers(cpu_only, None, cuda=CudaSettings(use_tf32=True)) == cpu_only
    for field, value, message in (("cuda_arena_extend_strategy", "kFast", "cuda_arena_extend_strategy must be one of"),
                                  ("gpu_mem_limit", 0, "gpu_mem_limit must be a positive int"),
                                  ("use_tf32", "yes", "use_tf32 must be True or False")):
        with pytest.raises(ValueError, match=message):
            EncoderConfig(**{field: value})  # type: ignore[arg-type]


def test_cuda_flags_map_onto_the_config(tiny_model: Path) -> None:
    words = ["embed", str(tiny_model), "--input", "-", "--output", "x.npy"]
    args = build_parser("embed").parse_args([*words, "--tf32", "--gpu-mem-limit", "4096",
                                             "--cuda-arena-extend-strategy", "kSameAsRequested"])
    config = load(args, lambda model_dir, config: config)
    assert (config.use_tf32, config.gpu_mem_limit, config.cuda_arena_extend_strategy) == (
        True, 4096, "kSameAsRequested")
    defaults = load(build_parser("embed").parse_args(words), lambda model_dir, config: config)
    assert defaults == EncoderConfig()


def test_load_failures_are_named_with_their_cause(tiny_model: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ONNX Runtime's refusal of CUDA graphs is a CudaGraphError; a corrupt file is a ModelLoadError, CUDA
    graphs asked for or not."""
    folder = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model, folder)
    (folder / "model.onnx").write_bytes(b"not an onnx graph" * 100)
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime could not load .*model\.onnx: .*") as caught:
        Encoder(folder, config=EncoderConfig(verify_checksums=False))
    assert isinstance(caught.value, ModelFolderError) and caught.value.__cause__ is not None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        real = ort.get_available_providers
        monkeypatch.setattr(ort, "get_available_providers", lambda: [*real(), "CUDAExecutionProvider"])
    # (Where the provider is faked, ONNX Runtime warns that it is not really there before it reads the file.)
    with warnings.catch_warnings(), pytest.raises(ModelLoadError, match="could not load"):
        warnings.simplefilter("ignore", UserWarning)
        create_session(folder / "model.onnx", resolve_providers(None, "cuda", cuda_graph=True), SessionSettings())
    # The refusal, in the words of both ONNX Runtime generations (inference_session.cc), read from its own class.
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    path = folder / "model.onnx"
    for words in ("This session cannot use the CUDA Graph feature as requested by the user  as all compute graph "
                  "nodes have not been partitioned to the CUDA EP.",
                  "This session cannot use the graph capture feature as requested by the user  as all compute "
                  "graph nodes have not been partitioned to the CUDAExecutionProvider"):
        refusal = Fail(f"[ONNXRuntimeError] : 1 : FAIL : {words}")
        error = load_error(path, refusal, cuda_graph=True)
        assert isinstance(error, CudaGraphError) and words in str(error) and "re-export" in str(error)
        assert isinstance(load_error(path, refusal, cuda_graph=False), ModelLoadError)
    out_of_memory = Fail("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer of size 1")
    assert isinstance(load_error(path, out_of_memory, cuda_graph=True), ModelLoadError)


def test_cli_flags_reach_the_config(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["one short text", "and another, somewhat longer text than the first"]
    (tmp_path / "in.txt").write_text("\n".join(texts), encoding="utf-8")
    args = ["embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy")]
    assert main([*args, "--io-binding", "--sequence-bucket", "32", "--max-tokens", "64", "--max-buckets", "2"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), Encoder(tiny_model).encode(texts), atol=1e-5, rtol=0)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main([*args, "--device", "cuda"]) == 1
        assert "deberta-onnx[gpu]" in capsys.readouterr().err
    assert main([*args, "--cuda-graph"]) == 1
    assert "cuda_graph needs CUDAExecutionProvider" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
def test_cuda_io_binding_equals_cpu(exported: tuple[Path, Path], corpus: list[str]) -> None:
    _, folder = exported
    texts = _texts(corpus, 64, seed=7)
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
