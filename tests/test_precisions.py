"""fp16, int8-dynamic and int8-static variants: building, the quality gate, batch invariance, runtime choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deberta_onnx.export import RECIPES, ExportConfig, QualityGateError, export_model
from deberta_onnx.export.precision import DEFAULT_FP16_RECIPE, fold_constants, split_sentences
from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import PRECISIONS, variant_file
from deberta_onnx.runtime.loader import best_precision
from deberta_onnx.runtime.manifest import sha256_file

from .conftest import HARD_TEXTS
from .graph_checks import check_folder_graphs
from .reference import reference_embeddings

DERIVED = PRECISIONS[1:]
THRESHOLD = {"fp16": 0.999, "int8-dynamic": 0.99, "int8-static": 0.99}
FAST = {"validation_shapes": ((2, 5), (3, 17)), "quiet": True}  # the fp32 grid is covered by test_export.py


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def every_precision(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, folder) with all four precisions, for each tiny checkpoint, default settings."""
    out = tmp_path_factory.mktemp("precisions") / "model"
    export_model(checkpoint, out, ExportConfig(precisions=DERIVED, **FAST))
    return checkpoint, out


def _sample(corpus: list[str]) -> list[str]:
    """Texts the gate did not see: the hard strings, and calibration sentences (not held out)."""
    calibration, _ = split_sentences(corpus)
    return HARD_TEXTS + calibration[::15]


def test_manifest_lists_every_variant_with_checksum_and_passed_gate(every_precision: tuple[Path, Path],
                                                                    corpus: list[str]) -> None:
    _, folder = every_precision
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["variants"]) == set(PRECISIONS)
    assert manifest["default_variant"] == "fp32"
    assert check_folder_graphs(folder) == sorted(PRECISIONS)  # each graph valid by the ONNX standard
    layers = manifest["model"]["num_hidden_layers"]
    _, held_out = split_sentences(corpus)
    for precision, entry in manifest["variants"].items():
        name = variant_file(precision)
        assert entry["file"] == name and entry["precision"] == precision
        assert manifest["files"][name]["sha256"] == sha256_file(folder / name)
        assert manifest["files"][name]["bytes"] == (folder / name).stat().st_size
        quality = entry["quality"]
        assert quality["sentences"] == 100 and quality["finite"] is True
        assert quality["bytes"] == (folder / name).stat().st_size
        if precision == "fp32":
            assert quality["min_cosine"] > 0.999999 and "threshold" not in quality
            continue
        assert quality["passed"] is True and quality["threshold"] == THRESHOLD[precision]
        assert THRESHOLD[precision] <= quality["min_cosine"] <= quality["mean_cosine"] <= 1.0 + 1e-12
        assert quality["max_abs_diff"] > 0  # a lower precision really was measured
        default = DEFAULT_FP16_RECIPE if precision == "fp16" else RECIPES[precision][0].name
        assert entry["recipe"] == default and entry["rejected_recipes"] == []
        assert quality["worst"]["text"] in held_out
    fp16, dynamic, static = (manifest["variants"][p]["nodes"] for p in DERIVED)
    # Every weight MatMul is converted; the four attention products per layer (content, content-to-position,
    # position-to-content, context) have no stored weight and stay in float.
    weights = 6 * layers
    assert fp16["matmuls"] == {"fp16_activation": 4 * layers, "fp16_weight": weights}
    for nodes in (dynamic, static):
        assert nodes["matmuls"] == {"fp32_activation": 4 * layers, "int8_weight": weights}
        assert nodes["embeddings"] == "int8"
    assert {"LayerNormalization", "Softmax", "ReduceSum", "Log"} <= set(fp16["fp32_nodes"])
    calibration = manifest["variants"]["int8-static"]["calibration"]
    assert calibration["texts"] == 300 and calibration["method"] == "minmax"


def test_every_precision_matches_pytorch_through_the_runtime(every_precision: tuple[Path, Path],
                                                             corpus: list[str]) -> None:
    checkpoint, folder = every_precision
    texts = _sample(corpus)
    expected = reference_embeddings(checkpoint, texts)
    for precision in DERIVED:
        encoder = Encoder(folder, config=EncoderConfig(precision=precision))
        assert encoder.precision == precision and encoder.precision_reason == "requested"
        actual = encoder.encode(texts, batch_size=8)
        assert actual.dtype == np.float32 and np.isfinite(actual).all()
        cosine = _cosine(actual, expected)
        assert cosine.min() >= THRESHOLD[precision], (precision, texts[int(cosine.argmin())], cosine.min())


def test_fp16_graph_loads_on_cpu_keeps_fp32_io_and_has_no_constant_matmul(every_precision: tuple[Path, Path]) -> None:
    _, folder = every_precision
    session = ort.InferenceSession(str(folder / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)", "tensor(int64)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    initializers = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceSum"):
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
        # The relative-position projections were folded at export: no MatMul is left with constant operands.
        if node.op_type == "MatMul":
            assert not all(name in initializers for name in node.input), node.name


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static"])
def test_int8_looks_up_embedding_rows_before_dequantizing(every_precision: tuple[Path, Path], precision: str) -> None:
    # Dequantizing the whole int8 word-embedding table to read a few rows of it cost more than the rest of a
    # batch-1 call on deberta-v3-base; the rows are gathered in int8 and only they are scaled back, by one scale
    # per row (a few large rows, as trained checkpoints have, then cost the others nothing).
    checkpoint, folder = every_precision
    model = onnx.load(str(folder / variant_file(precision)))
    initializers = {i.name: i for i in model.graph.initializer}
    readers = {name: node for node in model.graph.node for name in node.input}
    lookups = [node for node in model.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids"
               and node.input[0] in initializers]
    tables = [node for node in lookups if initializers[node.input[0]].data_type == onnx.TensorProto.INT8]
    scales = [node for node in lookups if initializers[node.input[0]].data_type == onnx.TensorProto.FLOAT]
    assert len(tables) == 1 and len(scales) == 1, "the word embeddings should be looked up in int8, with row scales"
    assert readers[tables[0].output[0]].op_type == "Cast"
    dequantize = readers[readers[tables[0].output[0]].output[0]]
    assert dequantize.op_type == "Mul" and scales[0].output[0] in dequantize.input
    assert not any(node.op_type == "DequantizeLinear" and node.input[0] == tables[0].input[0]
                   for node in model.graph.node)
    # The int8 rows times their scales are the fp32 table to within half a step of each row.
    from transformers import AutoModel

    table = AutoModel.from_pretrained(checkpoint).embeddings.word_embeddings.weight.detach().numpy()
    rows = onnx.numpy_helper.to_array(initializers[tables[0].input[0]]).astype(np.float32)
    step = onnx.numpy_helper.to_array(initializers[scales[0].input[0]])
    assert step.shape == (table.shape[0], 1)
    assert (np.abs(rows * step - table) <= step / 2 + 1e-7).all()


def test_static_int8_is_batch_invariant(every_precision: tuple[Path, Path], corpus: list[str]) -> None:
    _, folder = every_precision
    encoder = Encoder(folder, config=EncoderConfig(precision="int8-static"))
    short = ["a", "Hello world.", corpus[3], corpus[10]]
    long_neighbours = ["x" * 3000, " ".join(corpus[:40]), corpus[0]]
    alone = np.stack([encoder.encode(text) for text in short])
    batched = encoder.encode(long_neighbours + short, batch_size=32)[len(long_neighbours):]
    assert _cosine(alone, batched).min() >= 0.9999


def test_fold_constants_keeps_the_outputs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # An export without the graph speed-ups still projects the relative-position embeddings in the graph; the
    # precisions fold that constant part before converting (the default export folds it already, in PyTorch).
    config = ExportConfig(optimize=False, validate=False, quiet=True)
    plain = export_model(tiny_checkpoint, tmp_path / "plain", config).out_dir
    model = onnx.load(str(plain / "model.onnx"))
    before = sum(n.op_type == "LayerNormalization" for n in model.graph.node)
    folded = fold_constants(onnx.load(str(plain / "model.onnx")))
    # The relative-position embeddings' LayerNorm depends on no input, so it is gone.
    assert sum(n.op_type == "LayerNormalization" for n in folded.graph.node) == before - 1
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 2000, size=(3, 40), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    result = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(result, original, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("precision", DERIVED)
def test_gate_fails_with_an_impossible_threshold(tiny_checkpoint: Path, tmp_path: Path, precision: str) -> None:
    out = tmp_path / "model"
    config = ExportConfig(precisions=(precision,), min_cosine_fp16=1.0, min_cosine_int8=1.0, fallback=False, **FAST)
    message = (rf"{precision} failed the quality gate.*min cosine 0\.\d+ < 1\.00000000; "
               r"worst: held-out sentence \d+ .*drop --no-fallback")
    with pytest.raises(QualityGateError, match=message) as caught:
        export_model(tiny_checkpoint, out, config)
    assert caught.value.precision == precision
    (report,) = caught.value.reports
    assert report["passed"] is False and report["min_cosine"] < 1.0
    assert report["worst"]["text"][:60] in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left


@pytest.fixture(scope="module")
def fragile_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with one weight MatMul that int8 ruins: the second layer's feed-forward up-projection
    reads two channels that its LayerNorm makes 400 times smaller, through weights 400 times larger (the same
    function in fp32). Each output channel's int8 scale is then set by those two weights, and the rest round to
    zero. Its down-projection is 30 times larger, so that the feed-forward weighs in the output as a trained one
    does (at random initialisation each sublayer adds little to the residual stream). Keeping that MatMul in
    fp32 buys back the quality, which random weights alone do not show: their int8 error is spread evenly, and
    held-out cosines move by 1e-7 whichever MatMuls stay in fp32."""
    import torch
    from transformers import DebertaV2Model

    from .conftest import TOKENIZER_FILES

    out = tmp_path_factory.mktemp("fragile")
    model = DebertaV2Model.from_pretrained(tiny_checkpoint).eval()
    layer = model.encoder.layer[1]
    with torch.no_grad():
        layer.attention.output.LayerNorm.weight[:2] /= 400.0
        layer.attention.output.LayerNorm.bias[:2] /= 400.0
        layer.intermediate.dense.weight[:, :2] *= 400.0
        layer.output.dense.weight *= 30.0  # the feed-forward's share of the output as large as a trained one's
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, out / name)
    return out


@pytest.mark.slow
def test_fallback_tries_safer_recipes_and_says_so(fragile_checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    with pytest.raises(QualityGateError, match=r"recipe\(s\) tried: all, mixed\): with up to \d+ weight MatMuls in "
                                               r"fp32 the best min cosine on 64 calibration texts was") as caught:
        export_model(fragile_checkpoint, out, ExportConfig(precisions=("int8-dynamic",), min_cosine_int8=1.0, **FAST))
    first, mixed = caught.value.reports
    assert [first["recipe"], mixed["recipe"]] == [r.name for r in RECIPES["int8-dynamic"]]
    counts = [probe["fp32_matmuls"] for probe in mixed["search"]]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 6  # 1, 2, 4, then half of the 12
    assert list(tmp_path.iterdir()) == []
    # Keeping the MatMuls with the largest int8 error in fp32 buys quality: a gate half-way between what the
    # first recipe reached and what one fp32 MatMul reached is failed by the first, passed by the mixed one. The
    # gap is of the order of 1e-2 on this checkpoint, so the second export need not repeat the first's figures
    # to the last digit, only to within half of it.
    one = mixed["search"][0]["min_cosine"]
    assert one - first["min_cosine"] > 1e-3, (first["min_cosine"], one)
    threshold = (first["min_cosine"] + one) / 2
    capsys.readouterr()
    config = ExportConfig(precisions=("int8-dynamic",), min_cosine_int8=threshold,
                          validation_shapes=FAST["validation_shapes"])  # not quiet: it says it fell back
    entry = export_model(fragile_checkpoint, out, config).manifest["variants"]["int8-dynamic"]
    assert entry["recipe"] == "mixed" and [r["recipe"] for r in entry["rejected_recipes"]] == ["all"]
    kept = entry["nodes"]["kept_fp32"]
    ranking = [item["matmul"] for item in entry["nodes"]["sensitivity"]["ranking"]]
    assert kept and sorted(kept) == sorted(ranking[: len(kept)])
    assert entry["nodes"]["matmuls"]["fp32_weight"] == len(kept)
    assert entry["quality"]["min_cosine"] >= threshold
    assert "fell back to recipe 'mixed'" in capsys.readouterr().err


@pytest.mark.slow
def test_custom_calibration_file(tiny_checkpoint: Path, tmp_path: Path, corpus: list[str]) -> None:
    texts = corpus[1::4][:40]
    (tmp_path / "calibration.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    config = ExportConfig(precisions=("int8-static",), calibration=str(tmp_path / "calibration.txt"), **FAST)
    entry = export_model(tiny_checkpoint, tmp_path / "model", config).manifest["variants"]["int8-static"]
    assert entry["calibration"]["texts"] == 40
    assert entry["calibration"]["source"] == str(tmp_path / "calibration.txt")
    assert entry["quality"]["passed"] and entry["quality"]["batch_invariance"] >= 0.9999


def test_bad_calibration_file_fails_before_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    for path, message in ((tmp_path / "missing.txt", "cannot be read"), (tmp_path / "empty.txt", "has no text")):
        config = ExportConfig(precisions=("int8-static",), calibration=str(path), quiet=True)
        with pytest.raises(ValueError, match=message):
            export_model(tiny_checkpoint, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_export_config_checks_precisions_and_thresholds() -> None:
    assert ExportConfig(precisions=["int8-static", "fp16"]).precisions == ("fp32", "fp16", "int8-static")
    assert ExportConfig().precisions == ("fp32",)
    with pytest.raises(ValueError, match="unknown precision.*'int4'.*choose from fp32, fp16"):
        ExportConfig(precisions=("int4",))
    with pytest.raises(TypeError, match="tuple of names"):
        ExportConfig(precisions="fp16")  # type: ignore[arg-type]
    for bad in (0.0, 1.5, -1, True):
        with pytest.raises(ValueError, match="min_cosine_int8 must be a cosine in"):
            ExportConfig(min_cosine_int8=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        EncoderConfig(precision="int4")


def test_runtime_picks_the_best_precision_in_the_folder(every_precision: tuple[Path, Path], tmp_path: Path) -> None:
    _, source = every_precision
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    encoder = Encoder(folder)
    assert encoder.precision == "int8-static"
    assert "CPUExecutionProvider" in encoder.precision_reason
    manifest = json.loads((folder / "manifest.json").read_text())
    for removed, expected in (("int8-static", "int8-dynamic"), ("int8-dynamic", "fp32")):
        del manifest["variants"][removed]
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert Encoder(folder).precision == expected
    with pytest.raises(ValueError, match=r"precision 'int8-static' is not in .*--precision fp16,fp32,int8-static"):
        Encoder(folder, config=EncoderConfig(precision="int8-static"))


def test_best_precision_by_provider() -> None:
    every = list(PRECISIONS)
    assert best_precision(every, "CPUExecutionProvider")[0] == "int8-static"
    assert best_precision(["fp32", "int8-dynamic", "fp16"], "CPUExecutionProvider")[0] == "int8-dynamic"
    assert best_precision(every, "CUDAExecutionProvider")[0] == "fp16"
    assert best_precision(["fp32", "int8-static"], "CUDAExecutionProvider")[0] == "fp32"
    assert best_precision(every, "SomeOtherExecutionProvider", default="fp16") == ("fp16", "the manifest's default")


@pytest.mark.slow
def test_cli_exports_precisions_and_info_reports_the_gate(tiny_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    out = tmp_path / "model"
    assert main(["export", str(tiny_checkpoint), str(out), "--quiet", "--precision", "fp16,int8-dynamic",
                 "--precision", "int8-dynamic", "--min-cosine-int8", "0.95"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"fp32", "fp16", "int8-dynamic"}
    assert manifest["variants"]["int8-dynamic"]["quality"]["threshold"] == 0.95
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model.int8-dynamic.onnx" in info and "gate 0.95000000" in info and "gate 0.99900000" in info
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "bad"), "--quiet", "--precision", "int4"]) == 1
    assert "unknown precision" in capsys.readouterr().err


@pytest.mark.slow
def test_precisions_with_token_vectors_and_cls_pooling(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ExportConfig(precisions=("fp16", "int8-static"), token_embeddings=True, pooling="cls", **FAST)
    manifest = export_model(tiny_checkpoint, tmp_path / "model", config).manifest
    assert check_folder_graphs(tmp_path / "model") == ["fp16", "fp32", "int8-static"]
    for precision in ("fp16", "int8-static"):
        assert manifest["variants"][precision]["quality"]["passed"] is True
        session = ort.InferenceSession(str(tmp_path / "model" / variant_file(precision)),
                                       providers=["CPUExecutionProvider"])
        assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]


@pytest.mark.slow
def test_quantization_advice_is_silenced_but_the_callers_logging_is_not(tiny_checkpoint: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # ONNX Runtime's quantizer logs its advice ("Please consider to run pre-processing ...") with module-level
    # logging calls, through the root logger. The export drops those records by the file that made them; the
    # root logger's level stays the caller's, and so do the caller's own records.
    import logging

    import onnxruntime.quantization as quantization

    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    levels: list[int] = []
    real = quantization.quantize_dynamic

    def quantize_dynamic(*args: object, **kwargs: object) -> object:
        levels.append(root.level)
        logging.warning("the caller's own warning")
        logging.getLogger("caller").info("and its own logger's note")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_dynamic", quantize_dynamic)
    handler, level, filters = _Keep(logging.DEBUG), root.level, list(root.filters)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        export_model(tiny_checkpoint, tmp_path / "model", ExportConfig(precisions=("fp16", "int8-dynamic"),
                                                                       optimize=False, validate=False, quiet=True))
        assert root.level == logging.DEBUG and root.filters == filters
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert levels == [logging.DEBUG]
    messages = {(r.name, r.getMessage()) for r in records}
    assert {("root", "the caller's own warning"), ("caller", "and its own logger's note")} <= messages
    tools = tuple(str(Path(ort.__file__).parent / name) for name in ("quantization", "transformers"))
    assert [r.getMessage() for r in records if r.pathname.startswith(tools) and r.levelno < logging.ERROR] == []
    assert not any("pre-processing" in message for _, message in messages)
