"""Bad input, broken model folders and concurrent use: clear errors, and the same vectors every time."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.errors import (
    ChecksumMismatchError,
    ContractMismatchError,
    ManifestError,
    MemoryLimitError,
    ModelFolderError,
    ModelLoadError,
    ProviderUnavailableError,
)


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> Encoder:
    return Encoder(tiny_model)


# --- inputs -------------------------------------------------------------------------------------------------


def test_empty_and_whitespace_texts_give_finite_vectors(encoder: Encoder) -> None:
    out = encoder.encode(["", " ", "\t\n  ", "\x00", "a\x00b", "real text"])
    assert out.shape == (6, encoder.hidden_size)
    assert np.isfinite(out).all()
    # Empty and whitespace-only texts are [CLS] [SEP] alone: the same vector.
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_non_strings_are_a_type_error_naming_the_index(encoder: Encoder) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        encoder.encode(["fine", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        encoder.encode(["a", "b", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of str"):
        encoder.encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)


def test_lone_surrogate_is_a_value_error_naming_the_index(encoder: Encoder) -> None:
    with pytest.raises(ValueError, match=r"texts\[2\] is not valid Unicode: a lone surrogate U\+D800 at character 4"):
        encoder.encode(["ok", "fine", "bad \ud800 text"])


def test_100kb_text_is_truncated_or_refused(encoder: Encoder) -> None:
    huge = "lorem ipsum dolor sit amet " * 4000  # ~108 kB
    assert len(huge.encode()) > 100_000
    vector = encoder.encode([huge])
    prefix = encoder.encode([" ".join(huge.split()[:2000])])  # far more than 512 tokens as well
    np.testing.assert_allclose(vector, prefix, atol=1e-6)  # both cut at the same 512 tokens
    with pytest.raises(ValueError, match=r"texts\[0\] is longer than the model's maximum"):
        encoder.encode([huge], truncate=False)


@pytest.mark.slow
def test_100k_texts_stream_in_bounded_memory(tiny_model: Path) -> None:
    # Peak RSS after 20,000 texts and after 100,000 texts in one process: streaming keeps the growth to about
    # the output array (100,000 x 32 float32 = 12.8 MB), where holding every tokenized text would cost far more.
    code = textwrap.dedent(
        """
        import resource, sys
        from deberta_onnx.runtime import Encoder
        encoder = Encoder(sys.argv[1])
        texts = [f"sentence number {i} with some words" for i in range(100_000)]
        encoder.encode(texts[:20_000], batch_size=64)
        small = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = encoder.encode(texts, batch_size=64)
        big = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(small, big, out.shape[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    small_kb, big_kb, rows = map(int, result.stdout.split())
    assert rows == 100_000
    assert big_kb - small_kb < 60_000, f"peak RSS grew by {(big_kb - small_kb) / 1024:.0f} MB"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60), max_size=6))
def test_random_unicode_shape_finite_deterministic(encoder: Encoder, texts: list[str]) -> None:
    first = encoder.encode(texts, batch_size=4)
    second = encoder.encode(list(texts), batch_size=3)
    assert first.shape == (len(texts), encoder.hidden_size) and first.dtype == np.float32
    assert np.isfinite(first).all()
    np.testing.assert_allclose(first, second, atol=1e-6, rtol=0)
    ids = encoder.loaded.tokenizer.encode(texts)
    assert all(1 <= len(row) <= encoder.max_length for row in ids)


# --- model folders ------------------------------------------------------------------------------------------


@pytest.fixture
def folder_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def _edit_manifest(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_model_file(folder_copy: Path) -> None:
    (folder_copy / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="model.onnx is missing"):
        Encoder(folder_copy)


def test_corrupted_model_file(folder_copy: Path) -> None:
    data = bytearray((folder_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="model.onnx is corrupted or was replaced"):
        Encoder(folder_copy)


def test_unknown_manifest_version(folder_copy: Path) -> None:
    _edit_manifest(folder_copy, lambda m: m.update(manifest_version=2))
    with pytest.raises(ManifestError, match="manifest_version 2"):
        Encoder(folder_copy)


def test_manifest_disagrees_with_graph(folder_copy: Path) -> None:
    _edit_manifest(folder_copy, lambda m: m["graph"]["outputs"][0].update(dims=["batch", 64]))
    with pytest.raises(ContractMismatchError, match="last dimension 32, the manifest declares 64"):
        Encoder(folder_copy)


def test_manifest_declares_wrong_input_dtype(folder_copy: Path) -> None:
    _edit_manifest(folder_copy, lambda m: m["graph"]["inputs"][0].update(dtype="int32"))
    with pytest.raises(ContractMismatchError, match="needs input_ids"):
        Encoder(folder_copy)


def test_tokenizer_larger_than_embedding_table(folder_copy: Path) -> None:
    _edit_manifest(folder_copy, lambda m: m["model"].update(vocab_size=100))
    with pytest.raises(ContractMismatchError, match="embedding table has 100 rows"):
        Encoder(folder_copy)


def test_missing_tokenizer(folder_copy: Path) -> None:
    (folder_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="tokenizer.json is missing"):
        Encoder(folder_copy)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d["model"].pop("hidden_size"), "model.hidden_size"),
    (lambda d: d["model"].update(max_sequence_length="512"), "model.max_sequence_length"),
    (lambda d: d["model"].update(pooling="median"), "model.pooling"),
    (lambda d: d.update(variants={}), "variants"),
    (lambda d: d.update(variants=["fp32"]), "variants"),
    (lambda d: d["variants"]["fp32"].update(file="../model.onnx"), "variants.fp32.file"),
    (lambda d: d["variants"]["fp32"].update(file="/etc/passwd"), "variants.fp32.file"),
    (lambda d: d["graph"].update(inputs="input_ids"), "graph.inputs"),
    (lambda d: d["files"]["model.onnx"].update(sha256="xyz"), "files.model.onnx.sha256"),
    (lambda d: d.update(default_variant="fp16"), "default_variant"),
])
def test_a_mistyped_or_escaping_manifest_field_is_named(folder_copy: Path, edit, field: str) -> None:  # type: ignore[no-untyped-def]
    _edit_manifest(folder_copy, edit)
    with pytest.raises(ManifestError, match=re.escape(field)):
        Encoder(folder_copy)


@pytest.mark.fresh_export
def test_max_sequence_length_is_bounded_by_what_the_tokenizer_declares(folder_copy: Path) -> None:
    tokenizer = json.loads((folder_copy / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["truncation"]["max_length"] == 512  # the export declares the maximum in a checksummed file
    _edit_manifest(folder_copy, lambda m: m["model"].update(max_sequence_length=100_000))
    with pytest.raises(ContractMismatchError, match=r"model.max_sequence_length is 100000 tokens, but its "
                                                    r"tokenizer.json declares 512"):
        Encoder(folder_copy)


def _declare_max_length(folder: Path, length: int) -> None:
    """Edits both files, as a folder legitimately exported for ``length`` tokens would have them (unchecksummed)."""
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer["truncation"]["max_length"] = length
    path.write_text(json.dumps(tokenizer), encoding="utf-8")
    _edit_manifest(folder, lambda m: m["model"].update(max_sequence_length=length))


@pytest.mark.fresh_export
def test_one_text_may_not_need_more_than_the_memory_limit(folder_copy: Path) -> None:
    from deberta_onnx.runtime import EncoderConfig
    from deberta_onnx.runtime.batching import batch_capacity, call_memory

    _declare_max_length(folder_copy, 12_000)  # ~26 GB for one such text on this graph
    unchecked = EncoderConfig(verify_checksums=False)
    with pytest.raises(MemoryLimitError, match=r"inputs of up to 12000 tokens; one of them would need about "
                                               r"26,367 MB .* over the limit of 8,192 MB"):
        Encoder(folder_copy, config=unchecked)
    loaded = Encoder(folder_copy, config=EncoderConfig(verify_checksums=False, max_call_memory_mb=None))
    assert loaded.max_length == 12_000  # the limit turned off: loads (nothing long is encoded here)
    # Under the limit, batches hold fewer rows where more would pass it, and never fewer than one.
    limit = call_memory(10, 512, 4)
    assert batch_capacity(512, batch_size=32, max_tokens=None, max_call_bytes=limit, heads=4) == 10
    assert batch_capacity(64, batch_size=32, max_tokens=None, max_call_bytes=limit, heads=4) == 32
    assert batch_capacity(4096, batch_size=32, max_tokens=None, max_call_bytes=limit, heads=4) == 1


def test_a_truncated_graph_is_a_model_load_error(folder_copy: Path) -> None:
    from deberta_onnx.runtime import EncoderConfig

    graph = folder_copy / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"could not load .*model.onnx: .*truncated, corrupted or not an ONNX"):
        Encoder(folder_copy, config=EncoderConfig(verify_checksums=False))


@pytest.mark.fresh_export
def test_the_cli_prints_named_errors_without_a_traceback(tiny_model: Path, tmp_path: Path) -> None:
    """Each broken folder through the real command: one `error:` line naming the problem, exit 1."""
    folders = {}
    for name in ("truncated", "too-long", "memory", "bad-field"):
        folders[name] = Path(shutil.copytree(tiny_model, tmp_path / name))
    graph = folders["truncated"] / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    _edit_manifest(folders["too-long"], lambda m: m["model"].update(max_sequence_length=100_000))
    _declare_max_length(folders["memory"], 100_000)
    _edit_manifest(folders["bad-field"], lambda m: m["variants"]["fp32"].update(file="../../x.onnx"))
    (tmp_path / "in.txt").write_text("a text\n", encoding="utf-8")
    expected = {"truncated": "could not load", "too-long": "model.max_sequence_length is 100000",
                "memory": "over the limit of 8,192 MB", "bad-field": "outside the model folder"}
    for name, says in expected.items():
        result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "embed", str(folders[name]),
                                 "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "v.npy"),
                                 "--no-verify"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, (name, result.stderr)
        assert result.stderr.startswith("error: ") and says in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
    assert not (tmp_path / "v.npy").exists()


def test_the_export_cannot_write_a_manifest_the_runtime_refuses(folder_copy: Path) -> None:
    from deberta_onnx.runtime.manifest import load_manifest, write_manifest

    data = load_manifest(folder_copy).to_dict()
    data["variants"]["fp32"]["file"] = "../elsewhere.onnx"
    before = (folder_copy / "manifest.json").read_bytes()
    with pytest.raises(ManifestError, match="outside the model folder"):
        write_manifest(folder_copy, data)
    assert (folder_copy / "manifest.json").read_bytes() == before


def test_unknown_precision_lists_what_exists(tiny_model: Path) -> None:
    from deberta_onnx.runtime import EncoderConfig

    with pytest.raises(ValueError, match=r"precision 'int8-static' is not in .* it holds \['fp32'\]"):
        Encoder(tiny_model, config=EncoderConfig(precision="int8-static"))
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, int8-dynamic, int8-static"):
        EncoderConfig(precision="int4")


def test_cuda_requested_without_it_is_an_error_not_a_cpu_run(tiny_model: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-gpu"):
        Encoder(tiny_model, providers=["CUDAExecutionProvider"])


# --- concurrency --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_encoder_shared_by_8_threads(encoder: Encoder, corpus: list[str]) -> None:
    rng = np.random.default_rng(7)
    calls = [[corpus[i] for i in rng.choice(len(corpus), size=int(rng.integers(1, 9)))] for _ in range(1000)]
    expected = [encoder.encode(texts) for texts in calls]
    results: list[np.ndarray | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(worker, len(calls), 8):
                results[index] = encoder.encode(calls[index])
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected):
        assert got is not None
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# --- manifest fields the graph and the tokenizer fix: checked at load, not at the first call ----------------------


@pytest.mark.parametrize(("edit", "says"), [
    # Loaded, /health said 200, and every padded batch was a 500 (ONNX Runtime's Gather error).
    (lambda m: m["model"].update(pad_token_id=5000), r"model.pad_token_id is 5000, but tokenizer.json has 2000 "
                                                     r"tokens \(ids 0 to 1999\); every padded batch would fail"),
    # A numpy shape error at the first call.
    (lambda m: m["model"].update(hidden_size=64), r"model.hidden_size is 64, but .*model.onnx's output "
                                                  r"sentence_embedding has 32 values on its last axis"),
], ids=["pad-past-vocabulary", "hidden-size"])
def test_manifest_fields_disagreeing_with_the_graph_fail_at_load(folder_copy: Path, edit, says: str) -> None:  # type: ignore[no-untyped-def]
    _edit_manifest(folder_copy, edit)
    with pytest.raises(ContractMismatchError, match=says):
        Encoder(folder_copy)


def test_a_label_count_disagreeing_with_the_graph_fails_at_load(nli: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime import SequenceClassifier
    from deberta_onnx.runtime.cli import main

    folder = Path(shutil.copytree(nli[1], tmp_path / "nli"))
    _edit_manifest(folder, lambda m: m["model"].update(labels=["yes", "no"]))
    with pytest.raises(ContractMismatchError, match=r"model.labels is 2 labels, but .*model.onnx's output logits "
                                                    r"has 3 values on its last axis"):
        SequenceClassifier(folder)
    (tmp_path / "in.txt").write_text("a text\n", encoding="utf-8")
    assert main(["classify", str(folder), "--input", str(tmp_path / "in.txt")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {folder / 'manifest.json'}: model.labels is 2 labels")
