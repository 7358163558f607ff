"""Checkpoints with the activation outliers of trained encoders: the fixture itself, fp32 validation that scales
with the values, int8 with the outlier channels split off, and the fp16 range audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from deberta_onnx.export import CheckpointError, ExportConfig, Recipe, ValidationError, export_model
from deberta_onnx.export.precision import (
    build_variant,
    collect_activation_stats,
    find_outlier_channels,
    held_out_set,
    int8_units,
    measure,
    prepare_base,
    split_outlier_channels,
    split_sentences,
)
from deberta_onnx.export.testing import OutlierSpec, build_random_checkpoint, parse_outliers, random_source, validate
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.tokenization import TextTokenizer

from .conftest import HARD_TEXTS, TINY_CONFIGS
from .graph_checks import check_folder_graphs
from .reference import reference_embeddings

FAST = {"validation_shapes": ((1, 1), (2, 7), (5, 40)), "quiet": True}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def outlier_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """A tiny checkpoint with 3 hidden dimensions at ~1,000x the median, and large [CLS]/[SEP]/./, embeddings."""
    return build_random_checkpoint(TINY_CONFIGS["v3-shared"], tmp_path_factory.mktemp("outliers"), texts=corpus,
                                   seed=1, outliers=OutlierSpec())


@pytest.fixture(scope="module")
def outlier_export(outlier_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every precision of ``outlier_checkpoint`` at the default settings (thresholds, tolerances, recipes)."""
    out = tmp_path_factory.mktemp("outlier-export") / "model"
    export_model(outlier_checkpoint, out, ExportConfig(precisions=("fp16", "int8-dynamic", "int8-static"), **FAST))
    return out


def _hidden_states(checkpoint: Path, texts: list[str]) -> list[torch.Tensor]:
    from transformers import AutoModel

    from .reference import reference_ids

    ids, mask = reference_ids(checkpoint, texts)
    with torch.no_grad():
        states = AutoModel.from_pretrained(checkpoint).eval()(input_ids=ids, attention_mask=mask,
                                                              output_hidden_states=True).hidden_states
    return [state[mask.bool()] for state in states]


def test_outlier_checkpoint_has_large_dims_and_says_so(outlier_checkpoint: Path, corpus: list[str]) -> None:
    record = json.loads((outlier_checkpoint / "config.json").read_text())["deberta_onnx_outliers"]
    assert record["measured_ratio"] >= 1000 and record["scale"] == 1500 and len(record["dims"]) == 3
    assert record["token_ids"] and set(record["tokens"]) == {"[CLS]", "[SEP]", ".", ","}
    states = _hidden_states(outlier_checkpoint, corpus[:12])
    dims = record["dims"]
    for state in states[:-1]:  # every LayerNorm output but the last (final=False)
        median = state.abs().median()
        assert state[:, dims].abs().max() > 500 * median
        others = np.delete(state.numpy(), dims, axis=1)
        assert np.abs(others).max() < 20 * float(median)
    # The sentence vectors still depend on the sentence: the network is not swamped by its outliers.
    vectors = reference_embeddings(outlier_checkpoint, corpus[:12])
    pairs = _cosine(np.repeat(vectors, 12, axis=0), np.tile(vectors, (12, 1))).reshape(12, 12)
    assert pairs[~np.eye(12, dtype=bool)].mean() < 0.9
    from transformers import AutoModel

    table = AutoModel.from_pretrained(outlier_checkpoint).embeddings.word_embeddings.weight.detach()
    norms = table.norm(dim=1)
    assert (norms[record["token_ids"]] > 10 * norms.median()).all()


@pytest.mark.slow
def test_outlier_variants_differ_by_what_they_ask(tmp_path: Path, corpus: list[str]) -> None:
    spec = OutlierSpec(scale=300, dims=(3, 7), tokens=("[SEP]",), token_scale=5, final=True)
    checkpoint = build_random_checkpoint(TINY_CONFIGS["v3-shared"], tmp_path / "ckpt", texts=corpus, seed=2,
                                         outliers=spec)
    record = json.loads((checkpoint / "config.json").read_text())["deberta_onnx_outliers"]
    assert record["dims"] == [3, 7] and record["token_ids"] == [2] and record["final"] is True
    assert 150 <= record["measured_ratio"] <= 600
    last = _hidden_states(checkpoint, corpus[:4])[-1]
    assert last[:, [3, 7]].abs().max() > 100 * last.abs().median()  # final=True: they reach the output


def test_outlier_spellings_and_bad_options(tmp_path: Path) -> None:
    assert parse_outliers("outliers") == OutlierSpec()
    assert parse_outliers("outliers=400").scale == 400
    for bad, message in (("outlier", "unknown random-checkpoint option"), ("outliers=big", "must be a number"),
                         ("outliers=0.5", "must be a number")):
        with pytest.raises(ValueError, match=message):
            parse_outliers(bad)
    with pytest.raises(CheckpointError, match="unknown random-checkpoint option"):
        random_source("random:deberta-v3-xsmall+noise", tmp_path)
    with pytest.raises(ValueError, match="dims must be distinct"):
        OutlierSpec(dims=(1, 1))
    with pytest.raises(TypeError, match="tuple of pieces"):
        OutlierSpec(tokens="[SEP]")  # type: ignore[arg-type]


@pytest.mark.slow
def test_large_activations_pass_validation_and_the_manifest_labels_them(outlier_export: Path) -> None:
    manifest = json.loads((outlier_export / "manifest.json").read_text())
    assert manifest["source"]["random_weights"] is True
    assert check_folder_graphs(outlier_export) == ["fp16", "fp32", "int8-dynamic", "int8-static"]
    assert manifest["source"]["outliers"]["measured_ratio"] >= 1000
    report = manifest["variants"]["fp32"]["validation"]
    assert report["passed"] is True and report["rtol"] == 1e-5 and report["atol"] == 1e-4
    assert report["max_rel_diff"] > 0 and report["worst"]["excess"] <= 1.0


def _module(checkpoint: Path) -> torch.nn.Module:
    from transformers import AutoModel

    from deberta_onnx.export.testing import EmbeddingGraph

    return EmbeddingGraph(AutoModel.from_pretrained(checkpoint).eval(), pooling="mean", normalize=False,
                          token_embeddings=False).eval()


@pytest.mark.slow
def test_a_wrong_graph_still_fails_validation(outlier_checkpoint: Path, outlier_export: Path, tmp_path: Path) -> None:
    # One feed-forward weight 1% off: the kind of slip a graph rewrite makes. The outlier checkpoint is where a
    # tolerance grown to fit large values would hide it.
    model = onnx.load(str(outlier_export / "model.onnx"))
    initializers = {init.name: init for init in model.graph.initializer}
    made_by = {name: node for node in model.graph.node for name in node.output}
    up = next(node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers
              and any(made_by.get(name) is not None and made_by[name].op_type == "BiasGelu" for name in [
                  reader.output[0] for reader in model.graph.node if node.output[0] in reader.input]))
    weight = numpy_helper.to_array(initializers[up.input[1]]) * np.float32(1.01)
    initializers[up.input[1]].CopyFrom(numpy_helper.from_array(weight, up.input[1]))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    module = _module(outlier_checkpoint)
    specs = {"vocab": 2000, "max_length": 512, "inputs": module.inputs, "outputs": module.outputs,
             "shapes": ((2, 7), (5, 40)), "progress": False}
    assert validate(module, outlier_export / "model.onnx", **specs)["passed"] is True
    with pytest.raises(ValidationError, match=r"\|diff\| up to .* of the row's largest value\) exceeds atol") as caught:
        validate(module, tmp_path / "wrong.onnx", **specs)
    assert caught.value.report["worst"]["max_rel_diff"] > 1e-3


@pytest.mark.slow
def test_float64_reference_decides_when_fp32_rounding_is_large(tmp_path: Path, corpus: list[str]) -> None:
    # At 160,000x, fp32 loses digits inside the network to cancellation: PyTorch fp32 itself misses the float64
    # result by more than atol + rtol allow; the export compares with float64 then, allowing what fp32 costs.
    checkpoint = build_random_checkpoint(TINY_CONFIGS["v3-shared"], tmp_path / "ckpt", texts=corpus, seed=1,
                                         outliers=OutlierSpec(scale=200_000))
    report = export_model(checkpoint, tmp_path / "model", ExportConfig(**FAST)).manifest["variants"]["fp32"]
    rows = report["validation"]["shapes"]
    assert report["validation"]["passed"] is True
    assert any(row.get("float64_reference") and row["pytorch_fp32_rounding"] > 1e-3 for row in rows)


@pytest.mark.slow
def test_outlier_split_is_exact_in_fp32(outlier_export: Path, outlier_checkpoint: Path, tmp_path: Path,
                                        corpus: list[str]) -> None:
    base = prepare_base(outlier_export / "model.onnx", tmp_path / "folded.onnx")
    tokenizer = TextTokenizer(outlier_export / "tokenizer.json", max_length=512, pad_id=0)
    feeds = [dict(zip(("input_ids", "attention_mask"), tokenizer.pad([ids])))
             for ids in tokenizer.encode(corpus[1:80:2])]
    model = onnx.load(str(base))
    matmuls = int8_units(model)[0]
    inputs = {node.input[0] for node in model.graph.node if node.name in matmuls}
    stats = collect_activation_stats(base, feeds, channels_of=inputs)
    channels = find_outlier_channels(stats, inputs)
    assert channels and all(len(found) <= 8 for found in channels.values())
    summary = split_outlier_channels(model, channels, matmuls)
    assert summary["matmuls_split"] >= 2 * TINY_CONFIGS["v3-shared"]["num_hidden_layers"]
    ids, mask = tokenizer.pad(tokenizer.encode(HARD_TEXTS + corpus[:20]))
    feed = {"input_ids": ids, "attention_mask": mask}
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    before, after = run(str(base)), run(model.SerializeToString())
    # Exact up to fp32 rounding: no further from PyTorch's float64 result than the graph before the split is.
    with torch.no_grad():
        exact = _module(outlier_checkpoint).double()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    scale = np.abs(exact).max()
    assert np.abs(after - before).max() < 1e-4 * scale
    assert np.abs(after - exact).max() <= 2 * np.abs(before - exact).max() + 1e-7 * scale
    assert split_outlier_channels(onnx.load(str(base)), {}, matmuls)["matmuls_split"] == 0


@pytest.mark.slow
def test_int8_on_outliers_passes_the_gate_by_splitting_the_outlier_channels(
        outlier_export: Path, outlier_checkpoint: Path, corpus: list[str]) -> None:
    manifest = json.loads((outlier_export / "manifest.json").read_text())
    layers = TINY_CONFIGS["v3-shared"]["num_hidden_layers"]
    for precision in ("int8-dynamic", "int8-static"):
        entry = manifest["variants"][precision]
        assert entry["recipe"] == "all" and entry["quality"]["min_cosine"] >= 0.99, entry["quality"]
        nodes = entry["nodes"]
        assert nodes["matmuls"]["int8_weight"] == 6 * layers and nodes["embeddings"] == "int8"
        assert nodes["outlier_split"]["matmuls_split"] == nodes["matmuls"]["fp32_outlier_channels"] > 0
        dims = set(manifest["source"]["outliers"]["dims"])
        assert any(dims <= set(found) for found in nodes["outlier_split"]["tensors"].values())
    assert manifest["variants"]["int8-static"]["quality"]["batch_invariance"] >= 0.9999
    # Texts the gate did not see, through the runtime.
    _, held_out = split_sentences(corpus)
    texts = HARD_TEXTS + [text for text in corpus[2::9] if text not in held_out]
    expected = reference_embeddings(outlier_checkpoint, texts)
    for precision in ("int8-dynamic", "int8-static"):
        actual = Encoder(outlier_export, config=EncoderConfig(precision=precision)).encode(texts, batch_size=8)
        cosine = _cosine(actual, expected)
        assert cosine.min() >= 0.99, (precision, texts[int(cosine.argmin())], cosine.min())


@pytest.mark.slow
def test_without_the_split_int8_is_noise_on_outliers(outlier_export: Path, outlier_checkpoint: Path,
                                                    tmp_path: Path, corpus: list[str]) -> None:
    # What the fixture is for: ONNX Runtime's quantizer alone, one scale per tensor, loses the other channels.
    base = prepare_base(outlier_export / "model.onnx", tmp_path / "folded.onnx")
    tokenizer = TextTokenizer(outlier_export / "tokenizer.json", max_length=512, pad_id=0)
    calibration, held_out = split_sentences(corpus)
    feeds = [dict(zip(("input_ids", "attention_mask"), tokenizer.pad([ids]))) for ids in tokenizer.encode(calibration)]
    held = held_out_set(_module(outlier_checkpoint), tokenizer, held_out[:40])
    plain = Recipe("int8-static", "plain", "no split", split_outliers=False)
    build_variant(plain, base, tmp_path / "plain.onnx", calibration=feeds)
    assert measure(tmp_path / "plain.onnx", held)["min_cosine"] < 0.95


@pytest.mark.slow
def test_fp16_range_audit_keeps_what_would_overflow(tmp_path: Path, corpus: list[str]) -> None:
    # Hidden values of ~120,000: past fp16's 65,504. Without the audit the fp16 graph overflows (inf, then NaN);
    # with it the nodes that compute or read such values stay fp32 and the gate passes.
    checkpoint = build_random_checkpoint(TINY_CONFIGS["v3-shared"], tmp_path / "ckpt", texts=corpus, seed=1,
                                         outliers=OutlierSpec(scale=200_000))
    out = tmp_path / "model"
    manifest = export_model(checkpoint, out, ExportConfig(precisions=("fp16",), **FAST)).manifest
    entry = manifest["variants"]["fp16"]
    audit = entry["range_audit"]
    assert entry["quality"]["passed"] is True and entry["quality"]["finite"] is True
    assert audit["limit"] == 65504.0 and audit["threshold"] == audit["limit"] / audit["margin"]
    assert audit["largest_tensors"][1]["max_abs"] > 65504  # [0] is the attention mask's float32 minimum
    kept = audit["kept_fp32"]
    assert {"MatMul", "SkipLayerNormalization", "Where"} <= {item["op"] for item in kept.values()}
    assert all(item["max_abs"] > audit["threshold"] for item in kept.values())
    assert entry["nodes"]["matmuls"].get("fp32_weight", 0) > 0
    # The same conversion without the audit stores such values in fp16 tensors, where they become inf. (On the
    # CPU the output can still come out finite, so the gate alone cannot tell: every fp16 tensor is checked.)
    tokenizer = TextTokenizer(out / "tokenizer.json", max_length=512, pad_id=0)
    base = prepare_base(out / "model.onnx", tmp_path / "folded.onnx")
    blind = Recipe("fp16", "blind", "no audit", fp16_range_audit=False)
    build_variant(blind, base, tmp_path / "blind.onnx")
    ids, mask = tokenizer.pad(tokenizer.encode(corpus[:6]))
    feed = {"input_ids": ids, "attention_mask": mask}
    assert _fp16_overflows(tmp_path / "blind.onnx", feed) > 0
    assert _fp16_overflows(out / "model.fp16.onnx", feed) == 0


def _fp16_overflows(path: Path, feed: dict[str, np.ndarray]) -> int:
    """How many values of the graph's fp16 tensors are infinite on ``feed``."""
    model = onnx.load(str(path))
    names = [name for node in model.graph.node for name in node.output if name]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sum(int(np.isinf(value).sum()) for value in session.run(None, feed)
               if isinstance(value, np.ndarray) and value.dtype == np.float16)


def test_info_says_what_runs_in_int8_and_the_audit(outlier_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    assert main(["info", str(outlier_export)]) == 0
    info = capsys.readouterr().out
    assert "RANDOM weights with activation outliers: 3 hidden dims at" in info
    assert "outlier channels:" in info and "int8 weight" in info and "fp16 range audit:" in info


@pytest.mark.slow
def test_the_portable_graphs_pass_the_same_gates_on_outliers(outlier_checkpoint: Path, outlier_export: Path,
                                                             tmp_path: Path, corpus: list[str]) -> None:
    # --portable computes LayerNorm, Gelu and the residual adds from standard operators instead of ONNX Runtime's
    # fused kernels: on values 1,000x the median, that is where rounding could part from the fused graph.
    out = tmp_path / "portable"
    export_model(outlier_checkpoint, out, ExportConfig(precisions=("fp16", "int8-static"), portable=True, **FAST))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["optimization"]["portable"] is True
    assert check_folder_graphs(out) == ["fp16", "fp32", "int8-static"]
    assert manifest["variants"]["fp32"]["validation"]["passed"] is True
    for precision in ("fp16", "int8-static"):
        quality = manifest["variants"][precision]["quality"]
        print(f"portable {precision} on outliers: min cosine {quality['min_cosine']:.8f}")
        assert quality["passed"] is True, quality
    texts = corpus[:40]
    fused = Encoder(outlier_export, config=EncoderConfig(precision="fp32")).encode(texts)
    portable = Encoder(out, config=EncoderConfig(precision="fp32")).encode(texts)
    cosines = _cosine(fused, portable)
    print(f"portable fp32 against the fused fp32 on outliers: min cosine {cosines.min():.8f}")
    assert cosines.min() > 0.99999
