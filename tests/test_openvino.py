"""OpenVINO as a second CPU engine: the same folder, tokenizer, batching and outputs as ONNX Runtime; f32 forced
for fp32, bf16 as a runtime precision, ``auto`` by measurement, and the extra kept optional."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deberta_onnx.runtime import CrossEncoder, Encoder, EncoderConfig, SequenceClassifier, TokenClassifier
from deberta_onnx.runtime.cli import main
from deberta_onnx.runtime.contract import PRECISIONS
from deberta_onnx.runtime.errors import PrecisionUnavailableError
from deberta_onnx.runtime.postprocess import row_cosine

from .conftest import HARD_TEXTS

TEXTS = ["a", "a short sentence.", "A longer sentence, with commas, numbers (1,234) and more words than the others.",
         *HARD_TEXTS[:5], "x " * 60]
# Shapes the parity runs through: one text, texts padded beside longer ones, and batches that split the list.
BATCHES = (1, 3, 8)


def _ov(**fields: Any) -> EncoderConfig:
    return EncoderConfig(engine="openvino", engine_cache_dir=None, intra_op_threads=1, **fields)


def _ort(**fields: Any) -> EncoderConfig:
    return EncoderConfig(intra_op_threads=1, **fields)


def _assert_close(got: np.ndarray, want: np.ndarray, *, atol: float = 1e-4, cosine: float = 0.99999) -> None:
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) < atol, float(np.abs(got - want).max())
    assert float(row_cosine(got.astype(np.float64), want.astype(np.float64)).min()) >= cosine


# --- optional extra ---------------------------------------------------------------------------------------------


def test_onnxruntime_engine_never_imports_openvino(tiny_model: Path) -> None:
    code = textwrap.dedent("""
        import sys
        import deberta_onnx.runtime
        from deberta_onnx.runtime import Encoder, EncoderConfig
        from deberta_onnx.runtime.cli import build_parser
        build_parser("embed")
        vectors = Encoder(sys.argv[1], config=EncoderConfig(engine="onnxruntime")).encode(["a text", "another"])
        print("SHAPE", vectors.shape)
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] == "openvino"))
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "SHAPE (2, " in result.stdout and "LOADED []" in result.stdout


def test_missing_openvino_names_the_extra_and_auto_falls_back(tiny_model: Path, tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "openvino":
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, _Block())
        from deberta_onnx.runtime import Encoder, EncoderConfig
        try:
            Encoder(sys.argv[1], config=EncoderConfig(engine="openvino"))
        except ImportError as exc:
            print("REFUSED", type(exc).__name__, exc)
        auto = Encoder(sys.argv[1], config=EncoderConfig(engine="auto"))
        print("AUTO", auto.engine, "|", auto.engine_reason)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True,
                            timeout=300, env={"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "REFUSED MissingExtraError" in result.stdout and "pip install 'deberta-onnx[openvino]'" in result.stdout
    assert "AUTO onnxruntime | auto: OpenVINO is not installed" in result.stdout
    assert not (tmp_path / "deberta-onnx").exists()  # nothing measured, nothing cached


def test_config_refuses_what_openvino_cannot_do() -> None:
    with pytest.raises(ValueError, match="engine must be one of onnxruntime, openvino, auto"):
        EncoderConfig(engine="tensorrt")
    with pytest.raises(ValueError, match="engine='openvino' or engine='auto'"):
        EncoderConfig(precision="bf16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        EncoderConfig(engine="openvino", device="cuda")
    with pytest.raises(ValueError, match="ONNX Runtime features"):
        EncoderConfig(engine="openvino", io_binding=True)


# --- the same vectors -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ov() -> Any:
    """openvino; the tests that take it are skipped without the extra (the ones above run without it)."""
    return pytest.importorskip("openvino")


def test_fp32_vectors_equal_onnxruntime_with_f32_forced(ov: Any, tiny_model: Path) -> None:
    reference = Encoder(tiny_model, config=_ort(precision="fp32"))
    encoder = Encoder(tiny_model, config=_ov(precision="fp32"))
    assert encoder.engine == "openvino" and encoder.engine_reason == "requested" and encoder.session is None
    properties = encoder.loaded.openvino.compiled  # type: ignore[union-attr]
    assert properties.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert int(properties.get_property("INFERENCE_NUM_THREADS")) == 1
    for batch in BATCHES:
        _assert_close(encoder.encode(TEXTS, batch_size=batch), reference.encode(TEXTS, batch_size=batch))
    # Padding: a text's vector alone equals its vector in a batch padded to a longer text.
    _assert_close(encoder.encode(TEXTS[:1]), encoder.encode(TEXTS, batch_size=len(TEXTS))[:1], atol=1e-5)


def test_runner_takes_any_shape_after_one_compile(ov: Any, tiny_model: Path) -> None:
    reference = Encoder(tiny_model, config=_ort(precision="fp32")).loaded.runner
    runner = Encoder(tiny_model, config=_ov(precision="fp32")).loaded.runner
    rng = np.random.default_rng(0)
    for rows, tokens in ((1, 1), (2, 7), (5, 40), (3, 129), (1, 7)):
        ids = rng.integers(5, 100, size=(rows, tokens), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[0, tokens // 2 + 1:] = 0  # the first row padded
        (got,), (want,) = runner.run(ids, mask), reference.run(ids, mask)
        _assert_close(got, want)


def test_compiled_model_is_cached_for_the_next_start(ov: Any, tiny_model: Path, tmp_path: Path) -> None:
    config = EncoderConfig(engine="openvino", precision="fp32", engine_cache_dir=str(tmp_path / "cache"))
    first = Encoder(tiny_model, config=config).encode(TEXTS)
    blobs = sorted((tmp_path / "cache").glob("*.blob"))
    assert blobs, "OpenVINO wrote no compiled model to CACHE_DIR"
    stamps = [blob.stat().st_mtime_ns for blob in blobs]
    second = Encoder(tiny_model, config=config).encode(TEXTS)
    assert sorted((tmp_path / "cache").glob("*.blob")) == blobs  # read, not compiled and written again
    assert [blob.stat().st_mtime_ns for blob in blobs] == stamps
    np.testing.assert_array_equal(first, second)


@pytest.fixture(scope="module")
def int8_static(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("ov-int8") / "model"
    export_model(tiny_checkpoint, out, ExportConfig(precisions=("int8-static",), quiet=True,
                                                    validation_shapes=((2, 5), (3, 17))))
    return out


@pytest.mark.slow
def test_int8_static_within_the_gate(ov: Any, int8_static: Path, tiny_checkpoint: Path, corpus: list[str]) -> None:
    from deberta_onnx.export.precision import split_sentences

    from .reference import reference_embeddings

    texts = split_sentences(corpus)[1][:40]
    encoder = Encoder(int8_static, config=_ov())
    assert encoder.precision == "int8-static"  # OpenVINO's preference, as ONNX Runtime's, is int8-static first
    vectors = encoder.encode(texts, batch_size=8)
    gate = json.loads((int8_static / "manifest.json").read_text())["variants"]["int8-static"]["quality"]["threshold"]
    assert row_cosine(vectors.astype(np.float64), reference_embeddings(tiny_checkpoint, texts)).min() >= gate
    onnxruntime = Encoder(int8_static, config=_ort()).encode(texts, batch_size=8)
    assert row_cosine(vectors.astype(np.float64), onnxruntime.astype(np.float64)).min() >= 0.999


def _assert_same_answers(got: Any, want: Any) -> None:
    """Labels, spans and offsets equal; scores within 1e-4 (two engines round differently in the last bits)."""
    if dataclasses.is_dataclass(got) and not isinstance(got, type):
        got, want = dataclasses.asdict(got), dataclasses.asdict(want)  # type: ignore[call-overload]
    if isinstance(got, float):
        assert got == pytest.approx(want, abs=1e-4)
    elif isinstance(got, dict):
        assert got.keys() == want.keys()
        for key in got:
            _assert_same_answers(got[key], want[key])
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(want)
        for item, other in zip(got, want):
            _assert_same_answers(item, other)
    else:
        assert got == want


def test_classifiers_and_token_vectors_through_openvino(ov: Any, nli: tuple[Path, Path], reranker: tuple[Path, Path],
                                                        ner: tuple[Path, Path], sbert: tuple[Path, Path]) -> None:
    pairs = [("A man plays a guitar.", "Someone makes music."), ("It rains.", "The sun is out all day long.")]
    nli_ov, nli_ort = (SequenceClassifier(nli[1], config=config(precision="fp32")) for config in (_ov, _ort))
    np.testing.assert_allclose(nli_ov.logits(pairs), nli_ort.logits(pairs), atol=1e-4, rtol=0)
    _assert_same_answers(nli_ov.predict(pairs), nli_ort.predict(pairs))
    rerank_ov, rerank_ort = (CrossEncoder(reranker[1], config=config(precision="fp32")) for config in (_ov, _ort))
    np.testing.assert_allclose(np.asarray(rerank_ov.predict(pairs)), np.asarray(rerank_ort.predict(pairs)),
                               atol=1e-4, rtol=0)
    tagger, tagger_ort = TokenClassifier(ner[1], config=_ov()), TokenClassifier(ner[1], config=_ort())
    texts = ["Anna lives in Paris.", "Bob"]
    _assert_same_answers(tagger.predict(texts), tagger_ort.predict(texts))
    logits = [row for call in tagger.plan(texts) for row, _ in call.run()]
    logits_ort = [row for call in tagger_ort.plan(texts) for row, _ in call.run()]
    for got_row, want_row in zip(logits, logits_ort):
        np.testing.assert_allclose(got_row, want_row, atol=1e-4, rtol=0)
    tokens = Encoder(sbert[1], config=_ov()).encode_tokens(TEXTS)
    tokens_ort = Encoder(sbert[1], config=_ort()).encode_tokens(TEXTS)
    for got_item, want_item in zip(tokens, tokens_ort):
        assert got_item.tokens == want_item.tokens
        _assert_close(got_item.vectors, want_item.vectors)


# --- bf16 -------------------------------------------------------------------------------------------------------


def _bf16_or_skip() -> None:
    from deberta_onnx.runtime.openvino_engine import bf16_support

    supported, detail = bf16_support()
    if not supported:
        pytest.skip(f"no bf16 on this CPU ({detail}); the refusal is tested on its own")


def _bf16_gate(ov: Any, folder: Path, checkpoint: Path, texts: list[str]) -> tuple[float, Encoder]:
    """The export gate's check for bf16: per-sentence cosine to PyTorch fp32, texts alone and in batches of 8."""
    from .reference import reference_embeddings

    encoder = Encoder(folder, config=EncoderConfig(engine="openvino", precision="bf16", engine_cache_dir=None))
    compiled = encoder.loaded.openvino.compiled  # type: ignore[union-attr]
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    reference = reference_embeddings(checkpoint, texts)
    batched = encoder.encode(texts, batch_size=8).astype(np.float64)
    alone = np.concatenate([encoder.encode([text]) for text in texts]).astype(np.float64)
    fp32 = Encoder(folder, config=_ort(precision="fp32")).encode(texts, batch_size=8).astype(np.float64)
    assert row_cosine(fp32, reference).min() > 0.99999  # the reference is what the fp32 graph computes
    return float(min(row_cosine(batched, reference).min(), row_cosine(alone, reference).min())), encoder


def _runtime_precisions(compiled: Any) -> dict[str, set[str]]:
    """What OpenVINO runs each of the graph's nodes in: original name -> the runtime precisions of the nodes
    that carry it (a fused node carries several)."""
    precisions: dict[str, set[str]] = {}
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        precision = info["runtimePrecision"].astype(str)
        for name in info["originalLayersNames"].astype(str).split(","):
            precisions.setdefault(name, set()).add(precision)
    return precisions


def test_bf16_passes_the_gate_on_random_weights(ov: Any, tiny_model: Path, tiny_checkpoint: Path,
                                                 corpus: list[str]) -> None:
    from deberta_onnx.export.precision import split_sentences

    _bf16_or_skip()
    cosine, encoder = _bf16_gate(ov, tiny_model, tiny_checkpoint, split_sentences(corpus)[1])
    assert cosine >= 0.999
    # Random weights have no activation outliers: bf16 runs the whole graph.
    assert encoder.loaded.openvino.kept_f32 == () and encoder.loaded.openvino.split_f32 == {}  # type: ignore[union-attr]
    assert "kept in f32" not in encoder.precision_reason


@pytest.mark.slow
def test_bf16_passes_the_gate_on_activation_outliers(ov: Any, corpus: list[str],
                                                      tmp_path_factory: pytest.TempPathFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from deberta_onnx.export import ExportConfig, export_model
    from deberta_onnx.export.precision import split_sentences
    from deberta_onnx.export.testing import OutlierSpec, build_random_checkpoint
    from deberta_onnx.runtime import loader

    from .conftest import TINY_CONFIGS

    _bf16_or_skip()
    base = tmp_path_factory.mktemp("ov-outliers")
    checkpoint = build_random_checkpoint(TINY_CONFIGS["v3-shared"], base / "ckpt", texts=corpus, seed=1,
                                         outliers=OutlierSpec())
    export_model(checkpoint, base / "model", ExportConfig(quiet=True, validation_shapes=((2, 5),)))
    cosine, encoder = _bf16_gate(ov, base / "model", checkpoint, split_sentences(corpus)[1])
    assert cosine >= 0.999
    model = encoder.loaded.openvino  # type: ignore[union-attr]
    kept, splits = model.kept_f32, model.split_f32
    assert kept and splits
    assert (f"{len(kept)} nodes whole, and the outlier input channels of {len(splits)} matrix products"
            in encoder.precision_reason)
    # OpenVINO honours the marks: every kept node and every split-off product runs in f32, and the large products
    # beside them, with the rest of the graph's matrix products, in bf16.
    precisions = _runtime_precisions(model.compiled)
    marked = [*kept, *(f"{name}/{part}" for name in splits for part in ("f32-channels", "f32", "f32-sum"))]
    assert all(precisions.get(name, {"f32"}) == {"f32"} for name in marked), {n: precisions.get(n) for n in marked}
    assert all("bf16" in precisions[f"{name}/bf16"] for name in splits)
    # Without calibration texts nothing is kept, and bf16 fails the gate here (min cosine 0.80): what the marks do.
    monkeypatch.setattr(loader, "BF16_CALIBRATION_TEXTS", 0)
    cosine, encoder = _bf16_gate(ov, base / "model", checkpoint, split_sentences(corpus)[1])
    assert encoder.loaded.openvino.kept_f32 == () and cosine < 0.99  # type: ignore[union-attr]


def test_outlier_nodes_are_those_far_above_their_median(ov: Any) -> None:
    import openvino.opset13 as ops

    from deberta_onnx.runtime.openvino_engine import BF16_OUTLIER_RATIO, outlier_nodes

    x = ops.parameter([-1, 8], ov.Type.f32, name="x")
    scale = np.ones(8, np.float32)
    scale[3] = 1000.0  # one channel 1,000x the others, as a trained encoder's outlier dimension
    wide = ops.multiply(x, ops.constant(scale))
    wide.set_friendly_name("wide")
    plain = ops.add(x, ops.constant(np.float32(1.0)))
    plain.set_friendly_name("plain")
    total = ops.add(ops.reduce_sum(wide, ops.constant(np.int64(1)), keep_dims=True), plain)
    total.set_friendly_name("total")
    model = ov.Model([total], [x], "probe")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(3)]
    assert BF16_OUTLIER_RATIO == 64.0
    assert outlier_nodes(model, feeds, threads=1) == ["wide"]
    assert outlier_nodes(model, feeds, threads=1, ratio=1e6) == []
    assert len(model.outputs) == 1  # measured on a clone: the model keeps its one output


def _probe_model(ov: Any) -> Any:
    """x -> x @ W (a MatMul OpenVINO runs in bf16 under the bf16 hint), twice, the second one named ``kept``."""
    import openvino.opset13 as ops

    x = ops.parameter([-1, 16], ov.Type.f32, name="x")
    weights = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    first = ops.matmul(x, ops.constant(weights), False, False)
    first.set_friendly_name("plain")
    second = ops.matmul(first, ops.constant(weights), False, False)
    second.set_friendly_name("kept")
    return ov.Model([second], [x], "probe")


def test_kept_nodes_run_in_f32_under_the_bf16_hint(ov: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from deberta_onnx.runtime import openvino_engine
    from deberta_onnx.runtime.errors import ModelLoadError

    _bf16_or_skip()
    compiled = openvino_engine._compile_keeping_f32(_probe_model(ov), {"kept"}, {"INFERENCE_PRECISION_HINT": "bf16"})
    precisions = _runtime_precisions(compiled)
    assert precisions["kept"] == {"f32"} and precisions["plain"] == {"bf16"}
    # No room for the temporary IR: a clear error, not OpenVINO's.
    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(openvino_engine.tempfile, "TemporaryDirectory", full)
    with pytest.raises(ModelLoadError, match="temporary copy of the graph.*No space left.*TMPDIR"):
        openvino_engine._compile_keeping_f32(_probe_model(ov), {"kept"}, {"INFERENCE_PRECISION_HINT": "bf16"})


def test_outlier_channels_of_a_matrix_product_are_split_off_into_f32(ov: Any) -> None:
    import openvino.opset13 as ops

    from deberta_onnx.runtime import openvino_engine

    _bf16_or_skip()
    x = ops.parameter([-1, 64], ov.Type.f32, name="x")
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    doubled = ops.multiply(x, ops.constant(np.float32(2.0)))  # a computed input, as every MatMul in a graph has
    doubled.set_friendly_name("doubled")
    product = ops.matmul(doubled, ops.constant(weights), False, False)
    product.set_friendly_name("product")
    # Take the outlier channel's contribution out again, as a trained encoder's bias or residual stream does: what
    # is left is ordinary, and bf16's rounding of the large part would swamp it.
    taken = ops.subtract(product, ops.constant((2000.0 * weights[5]).astype(np.float32)))
    taken.set_friendly_name("taken")

    def model() -> Any:
        return ov.Model([taken.output(0)], [x], "probe").clone()

    inputs = rng.standard_normal((6, 64)).astype(np.float32)
    inputs[:, 5] += 1000.0  # channel 5 is an outlier of about 1,000x the others
    feeds = [{"x": inputs[i:i + 2]} for i in range(0, 6, 2)]
    plan = openvino_engine.bf16_plan(model(), feeds, threads=1)
    assert plan.splits == {"product": (5,)} and "product" not in plan.kept  # split, not kept whole
    want = 2.0 * inputs.astype(np.float64) @ weights.astype(np.float64) - 2000.0 * weights[5].astype(np.float64)
    properties = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}

    def error(compiled: Any) -> float:
        got = compiled.create_infer_request().infer({"x": inputs})[0]
        return float(np.abs(got - want).max() / np.abs(want).max())

    split = model()
    marked = set(plan.kept) | openvino_engine._split_channels(split, plan.splits)
    assert error(openvino_engine._compile_keeping_f32(split, marked, properties)) < 0.02
    assert error(openvino_engine._core().compile_model(model(), "CPU", properties)) > 0.1  # bf16 over it all


def test_bf16_outlier_search_is_cached_for_the_next_start(ov: Any, tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from deberta_onnx.runtime import openvino_engine

    _bf16_or_skip()
    calls = []
    search = openvino_engine.bf16_plan
    monkeypatch.setattr(openvino_engine, "bf16_plan", lambda *a, **k: calls.append(1) or search(*a, **k))
    config = EncoderConfig(engine="openvino", precision="bf16", engine_cache_dir=str(tmp_path), intra_op_threads=1)
    first = Encoder(tiny_model, config=config).encode(TEXTS)
    entries = json.loads((tmp_path / "bf16-kept-f32.json").read_text())
    assert len(calls) == 1 and [(entry["kept"], entry["splits"]) for entry in entries.values()] == [([], {})]
    second = Encoder(tiny_model, config=config).encode(TEXTS)
    assert len(calls) == 1  # read from the cache
    np.testing.assert_array_equal(first, second)
    (tmp_path / "bf16-kept-f32.json").write_text("not json")  # a broken cache is measured again, not an error
    Encoder(tiny_model, config=config)
    assert len(calls) == 2


def test_bf16_refused_where_the_cpu_lacks_it(ov: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deberta_onnx.runtime import openvino_engine

    monkeypatch.setattr(openvino_engine, "bf16_support", lambda: (False, "a CPU without AVX512-BF16 or AMX"))
    with pytest.raises(PrecisionUnavailableError, match="needs a CPU with AVX512-BF16 or AMX.*load precision 'fp32'"):
        Encoder(tiny_model, config=_ov(precision="bf16"))


# --- auto -------------------------------------------------------------------------------------------------------


def test_auto_measures_once_then_reads_the_cache(ov: Any, tiny_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = EncoderConfig(engine="auto", precision="fp32", engine_cache_dir=None, intra_op_threads=1)
    first = Encoder(tiny_model, config=config)
    # One engine, or both when each is measured faster on one shape (test_split_choice_is_cached_and_runs_both_engines).
    assert first.engine in ("onnxruntime", "openvino", "onnxruntime+openvino")
    assert first.engine_reason.startswith("auto: measured") and "1x32" in first.engine_reason
    entries = json.loads((tmp_path / "deberta-onnx" / "engine-choices.json").read_text())
    (entry,) = entries.values()
    assert entry["engine"] in first.engine and entry["precision"] == "fp32" and entry["threads"] == 1
    assert set(entry["timings_ms"]) == {"onnxruntime", "openvino"}
    second = Encoder(tiny_model, config=config)
    assert second.engine == first.engine and "cached in" in second.engine_reason
    _assert_close(second.encode(TEXTS), Encoder(tiny_model, config=_ort(precision="fp32")).encode(TEXTS))
    # info reports what auto runs here; tune measures again and says so.
    assert main(["info", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert f"fp32 with 1 threads runs {first.engine}: measured" in out and "openvino" in out
    assert main(["tune", str(tiny_model), "--precision", "fp32", "--threads", "1", "--no-verify"]) == 0
    assert "--engine auto runs" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "deberta-onnx" / "engine-choices.json").read_text())) == 1


class _Timed:
    """A runner whose calls 'take' a set time on a fake clock: one for 1 text x 32 tokens, one for 8 x 128."""

    def __init__(self, clock: list[float], small: float, large: float) -> None:
        self.clock, self.small, self.large = clock, small, large

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: Any = None) -> list[Any]:
        self.clock[0] += self.small if input_ids.shape[0] == 1 else self.large
        return []


def test_measure_picks_the_lower_geometric_mean() -> None:
    from deberta_onnx.runtime.tune import measure

    now = [0.0]
    runners = {"onnxruntime": _Timed(now, 0.010, 0.400), "openvino": _Timed(now, 0.0105, 0.250)}
    choice = measure(runners, vocab=100, clock=lambda: now[0], pause=lambda: None)  # type: ignore[arg-type]
    # ONNX Runtime is ahead at 1x32 by less than SPLIT_GAIN: one engine, the better one over both shapes.
    assert choice.engine == "openvino" and choice.small_engine is None and choice.split_tokens is None
    assert choice.timings_ms == {"onnxruntime": {"1x32": 10.0, "8x128": 400.0},
                                 "openvino": {"1x32": 10.5, "8x128": 250.0}}
    assert "8x128 250.0 vs 400.0 ms" in choice.reason


def test_measure_splits_the_calls_when_each_engine_wins_a_shape() -> None:
    from deberta_onnx.runtime.tune import measure

    now = [0.0]
    runners = {"onnxruntime": _Timed(now, 0.010, 0.400), "openvino": _Timed(now, 0.012, 0.250)}
    choice = measure(runners, vocab=100, clock=lambda: now[0], pause=lambda: None)  # type: ignore[arg-type]
    assert (choice.small_engine, choice.engine) == ("onnxruntime", "openvino")
    # The time ratio, log-linear in log tokens between 32 (0.833) and 1,024 (1.6), crosses 1 at 84 tokens.
    assert choice.split_tokens == 84
    assert choice.reason.startswith("measured on this CPU: onnxruntime for calls of up to 84 tokens, openvino above")
    # And the other way round.
    runners = {"onnxruntime": _Timed(now, 0.012, 0.250), "openvino": _Timed(now, 0.010, 0.400)}
    choice = measure(runners, vocab=100, clock=lambda: now[0], pause=lambda: None)  # type: ignore[arg-type]
    assert (choice.small_engine, choice.engine, choice.split_tokens) == ("openvino", "onnxruntime", 84)


def test_measure_keeps_one_engine_when_the_pair_is_slower_in_turn() -> None:
    from deberta_onnx.runtime.tune import measure

    class Spinning(_Timed):
        """As ``_Timed``, but a call right after the other runner's, with no pause between, takes 50 ms more (the
        other engine's threads still spinning on the cores)."""

        def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: Any = None) -> list[Any]:
            if state["last"] not in (None, self) and not state["settled"]:
                self.clock[0] += 0.050
            state["last"], state["settled"] = self, False
            return super().run(input_ids, attention_mask)

    state: dict[str, Any] = {"last": None, "settled": True}
    now = [0.0]
    runners = {"onnxruntime": Spinning(now, 0.010, 0.400), "openvino": Spinning(now, 0.012, 0.250)}
    choice = measure(runners, vocab=100, clock=lambda: now[0],  # type: ignore[arg-type]
                     pause=lambda: state.update(settled=True))
    # Each wins one shape when timed apart, but one call of each shape in turn takes 310 ms with both against
    # 262 ms with OpenVINO alone.
    assert choice.engine == "openvino" and choice.small_engine is None
    assert "both shapes in turn took 310.0 ms with both against 262.0 ms with openvino alone" in choice.reason


def test_split_choice_is_cached_and_runs_both_engines(ov: Any, tiny_model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from deberta_onnx.runtime import tune
    from deberta_onnx.runtime.runners import SplitRunner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    split = tune.EngineChoice(engine="openvino", small_engine="onnxruntime", split_tokens=64,
                              reason="measured on this CPU: onnxruntime for calls of up to 64 tokens, openvino above",
                              timings_ms={}, measured_at="2026-12-07T00:00:00Z")
    monkeypatch.setattr(tune, "measure", lambda runners, vocab: split)
    config = EncoderConfig(engine="auto", precision="fp32", engine_cache_dir=None, intra_op_threads=1)
    Encoder(tiny_model, config=config)
    monkeypatch.setattr(tune, "measure", lambda runners, vocab: pytest.fail("measured again"))
    encoder = Encoder(tiny_model, config=config)  # from the cache
    assert encoder.engine == "onnxruntime+openvino" and "cached in" in encoder.engine_reason
    assert encoder.loaded.split == ("onnxruntime", 64)
    assert encoder.loaded.provider == "CPUExecutionProvider + OpenVINO CPU"
    runner = encoder.loaded.runner
    assert isinstance(runner, SplitRunner)
    calls: list[str] = []
    for name in ("small", "large"):
        inner = getattr(runner, name)
        monkeypatch.setattr(runner, name, type("Counted", (), {
            "run": lambda self, *a, _inner=inner, _name=name: calls.append(_name) or _inner.run(*a)})())
    want = Encoder(tiny_model, config=_ort(precision="fp32"))
    _assert_close(encoder.encode(["a short text."]), want.encode(["a short text."]))
    assert calls == ["small"]
    long_texts = ["word " * 40] * 4  # 4 x ~42 tokens: above 64
    _assert_close(encoder.encode(long_texts, batch_size=4), want.encode(long_texts, batch_size=4))
    assert calls == ["small", "large"]
    # Runners for other outputs (token vectors, logits) split the same way.
    other = encoder.loaded.runner_for(("sentence_embedding",))
    assert isinstance(other, SplitRunner) and other.split_tokens == 64
    assert main(["info", str(tiny_model)]) == 0
    assert "fp32 with 1 threads runs onnxruntime+openvino: measured on this CPU" in capsys.readouterr().out


# --- CLI and server ---------------------------------------------------------------------------------------------


def test_cli_engine_flag(ov: Any, tiny_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS[:4]) + "\n", encoding="utf-8")
    for engine in ("openvino", "onnxruntime"):
        assert main(["embed", str(tiny_model), "--input", str(source), "--output", str(tmp_path / f"{engine}.npy"),
                     "--engine", engine, "--engine-cache-dir", "none", "--precision", "fp32", "--threads", "1"]) == 0
    _assert_close(np.load(tmp_path / "openvino.npy"), np.load(tmp_path / "onnxruntime.npy"))


def test_health_says_which_engine_runs(ov: Any, tiny_model: Path) -> None:
    import httpx

    from deberta_onnx.runtime.server.testing import ServerProcess

    with ServerProcess(tiny_model, "--threads", "1", "--engine", "openvino", "--engine-cache-dir", "none") as server:
        health = httpx.get(f"{server.url}/health", timeout=60).json()
        response = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[:3]}, timeout=60)
    assert health["engine"] == "openvino" and health["engine_reason"] == "requested"
    assert health["precision_reason"]  # why this variant (and, for bf16, how many nodes stay in f32)
    assert health["provider"] == "OpenVINO CPU" and health["models"][0]["engine"] == "openvino"
    assert response.status_code == 200
    vectors = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    want = Encoder(tiny_model, config=_ort(precision=health["precision"])).encode(TEXTS[:3], normalize=True)
    _assert_close(vectors, want)


# --- every variant of the default and the portable export --------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graphs", [pytest.param("default", marks=pytest.mark.slow), "portable"])
def test_every_variant_of_both_exports_runs_as_on_onnx_runtime(ov: Any, request: pytest.FixtureRequest, graphs: str,
                                                               precision: str) -> None:
    # The default graphs hold ONNX Runtime's contrib operators (SkipLayerNormalization, BiasGelu, the quantizer's),
    # which OpenVINO's ONNX front end implements; the portable ones standard operators only.
    folder = request.getfixturevalue("every_variant_model" if graphs == "default" else "portable_model")
    want = Encoder(folder, config=_ort(precision=precision)).encode(TEXTS)
    got = Encoder(folder, config=_ov(precision=precision)).encode(TEXTS)
    cosine = float(row_cosine(got.astype(np.float64), want.astype(np.float64)).min())
    print(f"OpenVINO {precision} ({graphs} export) against ONNX Runtime's: min cosine {cosine:.8f}, "
          f"max |difference| {float(np.abs(got - want).max()):.1e}")
    if precision == "fp32":
        _assert_close(got, want)
    else:  # other kernels round fp16 and int8 their own way: within a hair of ONNX Runtime's vectors
        assert cosine >= 0.9999
