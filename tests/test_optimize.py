"""Export-time graph speed-ups: folded relative-position attention and ONNX Runtime fusions, checked for equality
with the plain graph and with PyTorch on every tiny checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deberta_onnx.export import ExportConfig, export_model
from deberta_onnx.export.testing import folded_relative_attention, make_batch, relative_attention_layers


def _ops(folder: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node)


def test_optimized_graph_is_recorded_and_has_no_per_batch_repeat(exported: tuple[Path, Path]) -> None:
    _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    optimization = manifest["optimization"]
    assert optimization["enabled"] is True
    assert optimization["relative_attention_layers_folded"] == 2  # both layers of every tiny config
    assert optimization["fused_operators"].get("SkipLayerNormalization", 0) >= 2
    ops = _ops(folder)
    # No Tile (the per-batch repeat) and no GatherElements over a [B, H, S, S] index; the relative embeddings'
    # LayerNorm is gone too (only the embeddings' own LayerNorm can remain).
    assert ops["Tile"] == 0 and ops["GatherElements"] == 0
    assert ops["LayerNormalization"] <= 1


@pytest.mark.slow
def test_optimized_equals_plain_graph(tiny_checkpoint: Path, tiny_model: Path, tmp_path: Path) -> None:
    plain = export_model(tiny_checkpoint, tmp_path / "plain", ExportConfig(quiet=True, optimize=False))
    assert plain.manifest["optimization"] == {"enabled": False, "relative_attention_layers_folded": 0,
                                              "attention": "unfused", "attention_layers_fused": 0,
                                              "portable": False}
    assert _ops(tmp_path / "plain")["Tile"] > 0  # the plain graph still repeats per batch
    # tiny_model: the same checkpoint's export with the default settings, the speed-ups on.
    assert json.loads((tiny_model / "manifest.json").read_text())["optimization"]["enabled"] is True
    sessions = [ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
                for path in (plain.out_dir, tiny_model)]
    rng = np.random.default_rng(7)
    for batch, sequence in ((1, 1), (2, 2), (5, 31), (4, 130), (2, 512)):
        ids, mask = make_batch(batch, sequence, 1000, rng)
        a, b = (s.run(None, {"input_ids": ids, "attention_mask": mask})[0] for s in sessions)
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)


def test_folding_is_exact_in_torch_and_restored_on_exit(checkpoint: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint).eval()
    layers = relative_attention_layers(model)
    assert len(layers) == 2
    rng = np.random.default_rng(3)
    ids, mask = (torch.from_numpy(a) for a in make_batch(3, 300, 1000, rng))

    def state() -> list[tuple[set[str], set[str]]]:
        return [(set(vars(layer)), set(layer._non_persistent_buffers_set)) for layer in layers]

    untouched = state()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with folded_relative_attention(model) as count:
            folded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert count == 2
    torch.testing.assert_close(folded, before, atol=1e-5, rtol=0)
    assert torch.equal(after, before)
    for layer in layers:
        assert "disentangled_attention_bias" not in vars(layer)
        assert not any(name.startswith("_deberta_onnx") for name in dict(layer.named_buffers()))
    # Nothing left behind, the non-persistent buffer names included.
    assert state() == untouched
