"""The test session's memo of dynamo traces (``trace_cache.py``): a reused trace is the one a fresh trace writes,
and anything the trace depends on changes the key."""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path

import pytest
import torch

from deberta_onnx.export.testing import (
    TRANSLATIONS,
    EmbeddingGraph,
    export_onnx,
    folded_relative_attention,
    fused_attention,
    load_checkpoint,
)
from deberta_onnx.runtime.contract import OPSET

from .trace_cache import Tally, TraceCache, Uncacheable, trace_key


def _graph(src: Path, **options: object) -> EmbeddingGraph:
    return EmbeddingGraph(load_checkpoint(str(src)).model, **options).eval()  # type: ignore[arg-type]


def test_the_key_follows_everything_the_trace_depends_on(tiny_checkpoint: Path) -> None:
    graph = _graph(tiny_checkpoint, pooling="mean")
    key = trace_key(graph, 18, None)
    assert trace_key(_graph(tiny_checkpoint, pooling="mean"), 18, None) == key  # loaded again: the same
    others = {
        "pooling": trace_key(_graph(tiny_checkpoint, pooling="max"), 18, None),
        "normalize": trace_key(_graph(tiny_checkpoint, pooling="mean", normalize=True), 18, None),
        "token outputs": trace_key(_graph(tiny_checkpoint, pooling="mean", token_embeddings=True), 18, None),
        "opset": trace_key(graph, 17, None),
    }
    model = graph.encoder
    with folded_relative_attention(model):
        others["folded attention"] = trace_key(graph, 18, None)
        with fused_attention(model):
            others["fused attention"] = trace_key(graph, 18, TRANSLATIONS)
    assert trace_key(graph, 18, None) == key  # the rewrites undone: the same again
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    others["one weight"] = trace_key(graph, 18, None)
    assert len({key, *others.values()}) == len(others) + 1, others


class _Mode(enum.Flag):  # the shape of transformers' kernels mode, which it sets on every loaded model
    INFERENCE = 1
    TRAINING = 2


def test_an_enum_attribute_is_keyed_by_its_value(tiny_checkpoint: Path) -> None:
    keys = []
    for mode in (_Mode.INFERENCE, _Mode.INFERENCE, _Mode.TRAINING):
        graph = _graph(tiny_checkpoint, pooling="mean")
        graph.encoder.mode = mode  # type: ignore[assignment]
        keys.append(trace_key(graph, 18, None))
    assert keys[0] == keys[1] != keys[2]


def test_a_memo_that_cannot_key_or_reuse_fails_the_session() -> None:
    tally = Tally()
    assert tally.failure() is None
    tally.traced = 10
    assert "none reused" in (tally.failure() or "")
    tally.reasons.add("attribute of type Mode")
    assert "attribute of type Mode" in (tally.failure() or "")


def test_the_workers_tallies_are_judged_together() -> None:
    """Under pytest-xdist one worker may trace ten exports that only the other reuses: the run is judged on the
    sum, and a reason from any worker fails it."""
    total = Tally()
    total.add(Tally(traced=10).to_dict())
    assert "none reused" in (total.failure() or "")
    total.add(Tally(traced=2, reused=3).to_dict())
    assert total.failure() is None and (total.traced, total.reused) == (12, 3)
    total.add(Tally(uncacheable=1, reasons={"attribute of type Mode"}).to_dict())
    assert "1 export(s) could not be keyed (attribute of type Mode)" in (total.failure() or "")


def test_a_trace_kept_on_disk_is_reused_by_another_memo(tiny_checkpoint: Path, trace_memo: TraceCache,
                                                        tmp_path: Path) -> None:
    """The workers of one pytest-xdist run share traces through a folder: a second memo (another process's)
    writes the bytes the first one kept, without tracing. (The first wraps the session's memo, which has this
    trace from ``tiny_model``'s export if that ran in this process; else it traces.)"""
    first, second = TraceCache(trace_memo, tmp_path / "store"), TraceCache(export_onnx, tmp_path / "store")
    model = load_checkpoint(str(tiny_checkpoint)).model
    graph = EmbeddingGraph(model, pooling="mean").eval()
    with folded_relative_attention(model):
        first(graph, tmp_path / "a.onnx", opset=OPSET)
        second(graph, tmp_path / "b.onnx", opset=OPSET)
    assert (first.tally.traced, second.tally.traced, second.tally.reused) == (1, 0, 1)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert [path.suffix for path in (tmp_path / "store").iterdir()] == [".onnx"]  # no part file left behind


def test_a_value_the_key_cannot_describe_is_not_cached(tiny_checkpoint: Path) -> None:
    graph = _graph(tiny_checkpoint, pooling="mean")
    graph.encoder.opaque = object()  # type: ignore[assignment]
    with pytest.raises(Uncacheable, match="object"):
        trace_key(graph, 18, None)
    graph.encoder.register_forward_hook(lambda *args: None)
    del graph.encoder.opaque
    with pytest.raises(Uncacheable, match="hooks"):
        trace_key(graph, 18, None)


@pytest.mark.slow
def test_a_reused_trace_is_what_a_fresh_trace_writes(tiny_model: Path, tiny_checkpoint: Path,
                                                    trace_memo: TraceCache, tmp_path: Path) -> None:
    """The dynamo trace is deterministic: a fresh trace writes the bytes the session kept from ``tiny_model``'s
    export (or, if that export was not kept, from the memo's own trace here), which is what makes reusing them
    sound."""
    model = load_checkpoint(str(tiny_checkpoint)).model
    graph = EmbeddingGraph(model, pooling="mean").eval()
    with folded_relative_attention(model):
        trace_memo(graph, tmp_path / "memo.onnx", opset=OPSET)
        export_onnx(graph, tmp_path / "fresh.onnx", opset=OPSET)  # the exporter itself, not the memo
    memo, fresh = (hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("memo.onnx", "fresh.onnx"))
    assert memo == fresh
