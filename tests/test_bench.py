"""The benchmark harness: `deberta-onnx bench --quick` end to end on a tiny model, and its pieces. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.benchmarks import BenchConfig, ModelSpec, Shape, parse_shapes
from deberta_onnx.benchmarks.timing import Samples, time_calls
from deberta_onnx.benchmarks.workloads import build_corpus, grid_batch, token_lengths


@pytest.mark.slow
def test_quick_bench_writes_json_markdown_and_png(tiny_model: Path, tmp_path: Path) -> None:
    from deberta_onnx.runtime.cli import main

    out = tmp_path / "bench"
    assert main(["bench", f"tiny={tiny_model}", "--out", str(out), "--quick", "--quiet", "--corpus-size", "120"]) == 0

    document = json.loads((out / "results.json").read_text())
    env = document["environment"]
    assert env["random_weights"] is True
    assert {"torch", "transformers", "onnxruntime", "tokenizers"} <= set(env["versions"])
    assert env["hardware"]["logical_cores"] >= 1
    # The vector extensions int8 speed depends on, read from the CPU, and named in the markdown's header.
    features = env["hardware"]["cpu_features"]
    assert isinstance(features, list) and set(features) <= {
        "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_int8", "asimd",
        "asimddp", "sve", "i8mm"}
    header = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("- hardware"))
    assert all(name in header for name in features)
    rows = document["rows"]
    # PyTorch fp32 and the runtime's fp32 variant on each of 1x32, 8x128 and the corpus.
    assert {(r["engine"], r["shape"]) for r in rows} == {
        (engine, shape) for engine in ("pytorch", "onnxruntime") for shape in ("1x32", "8x128", "corpus 120")}
    for row in rows:
        assert row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"] and row["sentences_per_s"] > 0
        assert row["calls"] == (4 if row["workload"] == "corpus" else row["calls"]) >= 1 and row["rss_peak_mb"] > 0
        assert row["vs_pytorch"] is not None and row["vs_pytorch"] > 0
        # The runtime must agree with PyTorch on the same inputs, including the corpus (same tokenizer).
        assert row["min_cosine"] > 0.9999 and row["max_abs_diff"] < 1e-4, row
    grid = {r["shape"]: r for r in rows if r["workload"] == "grid" and r["engine"] == "onnxruntime"}
    assert grid["8x128"]["padded_rows"] == 4 and grid["1x32"]["padded_rows"] == 0
    corpus = next(r for r in rows if r["workload"] == "corpus")["corpus"]
    assert corpus["texts"] == 120 and corpus["tokens_min"] >= 5 and corpus["tokens_max"] <= 260

    table = (out / "results.md").read_text()
    assert "random weights" in table
    assert sum(1 for line in table.splitlines() if line.startswith(("| tiny ", "| pytorch"))) == len(rows)

    import matplotlib.image

    png = matplotlib.image.imread(out / "throughput.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100


def test_bench_without_torch_names_the_extras(tmp_path: Path) -> None:
    from .test_cli import _run

    code = "import sys\nfrom deberta_onnx.runtime.cli import main\nsys.exit(main(['bench', 'x', '--out', sys.argv[1]]))"
    result = _run(code, str(tmp_path / "out"))
    assert result.returncode == 3
    assert "deberta-onnx[export,bench]" in result.stderr or "deberta-onnx[export]" in result.stderr
    assert not (tmp_path / "out").exists()


def test_grid_batch_pads_the_second_half() -> None:
    ids, mask = grid_batch(Shape(8, 16), vocab=100, pad_id=0, seed=3)
    assert ids.shape == mask.shape == (8, 16) and ids.dtype == mask.dtype == np.int64
    assert (mask[:4] == 1).all()
    lengths = mask.sum(1)
    assert (lengths[4:] < 16).all() and (lengths[4:] >= 4).all()
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] >= 5).all()
    again, _ = grid_batch(Shape(8, 16), vocab=100, pad_id=0, seed=3)
    np.testing.assert_array_equal(ids, again)
    _, single = grid_batch(Shape(1, 32), vocab=100, pad_id=0)
    assert single.sum() == 32


def test_corpus_is_deterministic_and_spread(tiny_model: Path, corpus: list[str]) -> None:
    texts = build_corpus(corpus, tiny_model / "tokenizer.json", size=300, seed=1)
    assert texts == build_corpus(corpus, tiny_model / "tokenizer.json", size=300, seed=1)
    lengths = token_lengths(tiny_model / "tokenizer.json", texts)
    assert lengths.min() >= 5 and lengths.max() <= 260
    assert np.median(lengths) < 80 < lengths.max()  # mostly short, with a long tail
    with pytest.raises(ValueError, match="min_tokens"):
        build_corpus(corpus, tiny_model / "tokenizer.json", size=10, min_tokens=1)


def test_parse_shapes_and_config_errors(tmp_path: Path) -> None:
    assert parse_shapes("1x32, 8X128") == (Shape(1, 32), Shape(8, 128))
    assert parse_shapes("none") == ()
    for bad in ("8", "0x4", "ax3", "4x"):
        with pytest.raises(ValueError, match="BATCHxSEQUENCE"):
            parse_shapes(bad)
    assert ModelSpec.parse("base=/m/b") == ModelSpec(folder=Path("/m/b"), label="base")
    assert ModelSpec.parse("/m/xsmall").label == "xsmall"
    spec = (ModelSpec.parse(str(tmp_path)),)
    with pytest.raises(ValueError, match="device"):
        BenchConfig(models=spec, out_dir=tmp_path, device="tpu")
    with pytest.raises(ValueError, match="max_calls"):
        BenchConfig(models=spec, out_dir=tmp_path, min_calls=5, max_calls=2)
    with pytest.raises(ValueError, match="run path"):
        BenchConfig(models=spec, out_dir=tmp_path, paths=("fast",))
    with pytest.raises(ValueError, match="nothing to run"):
        BenchConfig(models=spec, out_dir=tmp_path, shapes=(), corpus_size=0)


def test_samples_summary_percentiles() -> None:
    samples = Samples()
    for ms in range(1, 101):
        samples.add(ms / 1000, 2)
    summary = samples.summary()
    assert summary["calls"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["sentences_per_s"] == pytest.approx(200 / 5.05)
    with pytest.raises(ValueError, match="no samples"):
        Samples().summary()
    calls = []
    result = time_calls(lambda: calls.append(1), sentences=1, warmup=2, repeats=3)
    assert len(calls) == 5 and result["calls"] == 3


def test_thread_settings_parse() -> None:
    from deberta_onnx.benchmarks import ThreadSetting

    assert ThreadSetting.parse("2") == ThreadSetting(intra_op_threads=2)
    assert ThreadSetting.parse("1:nospin") == ThreadSetting(intra_op_threads=1, allow_spinning=False)
    assert ThreadSetting.parse("default") == ThreadSetting()
    assert str(ThreadSetting.parse("2:spin")) == "2:spin" and str(ThreadSetting()) == "default"
    for bad in ("0", "two", "2:fast", ""):
        with pytest.raises(ValueError, match="thread setting"):
            ThreadSetting.parse(bad)


def test_cuda_report_names_the_build_tf32_and_the_ratio_to_pytorch_fp16() -> None:
    """The markdown of a CUDA run, from a hand-built document: which onnxruntime ran, TF32, the fp16 column."""
    from deberta_onnx.benchmarks.report import markdown

    row = {"model": "base", "shape": "1x32", "label": "onnxruntime fp16 cuda cudagraph", "p50_ms": 1.2, "p95_ms": 1.5,
           "sentences_per_s": 800.0, "vs_pytorch": 3.1, "vs_pytorch_fp16": 3.1, "min_cosine": 0.9995,
           "max_abs_diff": 1e-3, "rss_peak_mb": 3000.0, "rss_load_mb": 100.0, "gpu_mb": 512.0, "workload": "grid"}
    environment = {
        "hardware": {"cpu": "x", "physical_cores": 16, "logical_cores": 16, "memory_gb": 128, "gpu": "NVIDIA H200"},
        "versions": {"onnxruntime-gpu": "1.31.1"}, "settings": {"runtime_paths": ["cudagraph", "iobinding", "plain"]},
        "created_at": "now", "onnxruntime": {"version": "1.31.1", "device": "GPU", "file": "/tmp/site/onnxruntime/x.py",
                                              "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        "tf32": {"runtime_use_tf32": False, "torch_matmul_allow_tf32": False}}
    table = markdown({"environment": environment, "rows": [row]})
    assert "- onnxruntime 1.31.1 (GPU build) from `/tmp/site/onnxruntime/x.py`" in table
    assert "TF32 for fp32 matrix products on CUDA: off (the default); the runtime's use_tf32 = 0" in table
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "| x PyTorch | x PyTorch fp16 |" in header
    assert "| 3.10 | 3.10 | 0.999500 |" in table and "| 512 |" in table
    cpu = markdown({"environment": {**environment, "tf32": None}, "rows": [{**row, "vs_pytorch_fp16": None}]})
    assert "x PyTorch fp16" not in cpu and "TF32" not in cpu


def test_encoder_config_fields_reach_one_model_only(tiny_model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.benchmarks.backends import ThreadSetting, runtime_backends
    from deberta_onnx.runtime.cli import main

    spec = ModelSpec.parse(f"today={tiny_model}").with_field("max_tokens=none").with_field("cpu_arena=off")
    assert spec.fields == (("max_tokens", None), ("cpu_arena", "off"))
    assert ModelSpec.parse("a=dir").with_field("arena_shrink_tokens=4096").fields == (("arena_shrink_tokens", 4096),)
    with pytest.raises(ValueError, match="give FIELD=VALUE"):
        spec.with_field("cpu_arena")
    (backend,) = runtime_backends(tiny_model, ["fp32"], model="today", device="cpu", threads=[ThreadSetting()],
                                  paths=["plain"], fields=dict(spec.fields))
    config = backend.encoder.loaded.config
    assert config.max_tokens is None and config.cpu_arena == "off"
    args = ["bench", f"a={tiny_model}", "--out", str(tmp_path / "out"), "--quick", "--encoder-config"]
    assert main([*args, "b:max_tokens=none"]) == 1
    assert "no model labelled 'b' (a)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
