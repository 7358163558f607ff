"""Fused attention (one ONNX Runtime MultiHeadAttention kernel per layer) and inputs longer than 512 tokens:
checked against PyTorch and the unfused graph on every tiny checkpoint, with padding and all-padding rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deberta_onnx.export import ExportConfig, ExportError, export_model
from deberta_onnx.export.testing import (
    TRANSLATIONS,
    folded_relative_attention,
    fused_attention,
    make_batch,
    relative_attention_layers,
)
from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.batching import token_batches


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, fused-attention model folder) for each tiny checkpoint."""
    out = tmp_path_factory.mktemp("fused") / "model"
    export_model(checkpoint, out, ExportConfig(quiet=True, attention="fused"))
    return checkpoint, out


def _nodes(folder: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(folder / "model.onnx")).graph.node)


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_each_layer_is_one_kernel_and_the_manifest_says_so(exported: tuple[Path, Path]) -> None:
    checkpoint, folder = exported
    optimization = json.loads((folder / "manifest.json").read_text())["optimization"]
    assert optimization["attention"] == "fused"
    assert optimization["attention_layers_fused"] == 2
    assert "fused_attention_rejected" not in optimization
    nodes = _nodes(folder)
    kernels = [node for node in nodes if node.op_type == "MultiHeadAttention"]
    assert len(kernels) == 2 and all(node.domain == "com.microsoft" for node in kernels)
    # Scores, mask and softmax all happen inside the kernel.
    assert Counter(node.op_type for node in nodes)["Softmax"] == 0
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in kernels[0].attribute}
    config = json.loads((checkpoint / "config.json").read_text())
    terms = 1 + len(set(config["pos_att_type"]))
    head_size = config["hidden_size"] // config["num_attention_heads"]
    assert attributes["num_heads"] == config["num_attention_heads"]
    assert attributes["scale"] == pytest.approx(1 / np.sqrt(head_size * terms), rel=1e-6)
    # Inputs: query, key, value, no packed bias, the padding mask, the relative-position bias.
    assert kernels[0].input[3] == "" and all(kernels[0].input[i] for i in (0, 1, 2, 4, 5))


@pytest.mark.slow
def test_fused_equals_unfused_with_padding(exported: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, fused = exported
    # The fused graph was validated against PyTorch; the unfused one is compared with it here.
    unfused = export_model(checkpoint, tmp_path / "unfused", ExportConfig(quiet=True, attention="unfused",
                                                                        validate=False))
    assert unfused.manifest["optimization"]["attention"] == "unfused"
    assert not any(node.op_type == "MultiHeadAttention" for node in _nodes(unfused.out_dir))
    sessions = [_session(folder) for folder in (fused, unfused.out_dir)]
    rng = np.random.default_rng(11)
    for batch, sequence in ((1, 1), (3, 2), (6, 47), (5, 256), (4, 512)):  # from 4 rows, one is all padding
        ids, mask = make_batch(batch, sequence, 1000, rng)
        a, b = (s.run(None, {"input_ids": ids, "attention_mask": mask})[0] for s in sessions)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
        if batch >= 4:
            assert not a[-1].any()  # the all-padding row pools to zeros


def test_the_rewrite_runs_in_torch_and_is_undone_on_exit(checkpoint: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint).eval()
    ids, mask = (torch.from_numpy(a) for a in make_batch(5, 90, 1000, np.random.default_rng(5)))
    keep = mask.bool()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with folded_relative_attention(model), fused_attention(model) as count:
            fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert count == 2
    # Padded query rows may differ (the kernel masks keys only); every token's vector does not.
    torch.testing.assert_close(fused[keep], before[keep], atol=1e-5, rtol=0)
    assert torch.equal(after, before)
    for layer in relative_attention_layers(model):
        assert "forward" not in vars(layer) and "disentangled_attention_bias" not in vars(layer)


def test_without_the_folding_nothing_is_fused(tiny_checkpoint: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    with fused_attention(model) as count:
        assert count == 0


@pytest.mark.slow
def test_a_fused_graph_that_fails_validation_falls_back_to_the_unfused_one(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxscript import opset18

    (op,) = TRANSLATIONS
    translate = TRANSLATIONS[op]

    def broken(*args: Any) -> Any:  # a kernel whose output is 100 times too large
        return opset18.Mul(translate(*args), opset18.Constant(value_float=100.0))

    monkeypatch.setitem(TRANSLATIONS, op, broken)
    # Two shapes, one padded, catch it (and keep the two exports quick).
    config = ExportConfig(quiet=True, attention="fused", validation_shapes=((2, 7), (3, 64)))
    result = export_model(tiny_checkpoint, tmp_path / "model", config)
    optimization = result.manifest["optimization"]
    assert optimization["attention"] == "unfused" and optimization["attention_layers_fused"] == 0
    assert "disagree" in optimization["fused_attention_rejected"]
    assert not any(node.op_type == "MultiHeadAttention" for node in _nodes(result.out_dir))
    assert result.manifest["variants"]["fp32"]["validation"]["passed"]


def test_attention_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="attention must be one of fused, unfused"):
        ExportConfig(attention="flash")


@pytest.mark.slow
def test_relative_only_checkpoints_export_past_512_tokens(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    result = export_model(tiny_checkpoint, tmp_path / "long", ExportConfig(quiet=True, max_length=2048))
    manifest = result.manifest
    assert manifest["model"]["max_sequence_length"] == 2048
    validated = {(row["batch"], row["sequence"]) for row in manifest["variants"]["fp32"]["validation"]["shapes"]}
    assert {(1, 2048), (2, 1000), (4, 1500)} <= validated
    encoder = Encoder(result.out_dir)
    words = [f"word{i}" for i in range(3000)]
    # A text past 2048 tokens (cut), one between 512 and 2048, and a short one.
    middle = next(text for text in (" ".join(words[:n]) for n in range(50, 3000, 50))
                  if encoder.token_count([text])[0] > 700)
    texts = [" ".join(words), middle, "short"]
    counts = encoder.token_count(texts)
    assert counts[0] == 2048 and 700 < counts[1] < 2048
    # The CPU's automatic budget runs texts past 1024 tokens one a call (their attention scores: as much as 8
    # texts of 512), short ones 32 a call as ever.
    loaded = encoder.loaded
    shapes = [batch.input_ids.shape for batch in token_batches(loaded.tokenizer, [texts[0]] * 3 + ["short"] * 40,
                                                                loaded.policy, None, truncate=True)]
    assert shapes[:3] == [(1, 2048)] * 3 and shapes[3][0] == 32
    vectors = encoder.encode(texts)
    # The same ids through transformers, one text at a time (no padding).
    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    for text, vector in zip(texts, vectors):
        ids = torch.tensor([encoder.loaded.tokenizer.encode([text])[0]])
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)[0]
        np.testing.assert_allclose(vector, expected.numpy(), atol=1e-4, rtol=0)


def test_checkpoints_with_absolute_positions_stop_at_their_table(checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    if not config.get("position_biased_input", True):
        pytest.skip("relative positions only: longer inputs are allowed")
    with pytest.raises(ExportError, match="absolute position table"):
        export_model(checkpoint, tmp_path / "long", ExportConfig(quiet=True, max_length=1024))
