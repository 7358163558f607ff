"""The export stage: graph shape and contract, manifest, validation, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from deberta_onnx.export import (
    ExportConfig,
    OutputExistsError,
    UnsupportedModelError,
    ValidationError,
    export_model,
)
from deberta_onnx.export.testing import control_flow_nodes
from deberta_onnx.runtime.contract import INPUTS, SENTENCE_OUTPUT
from deberta_onnx.runtime.manifest import sha256_file

from .conftest import TOKENIZER_FILES


def test_graph_has_no_control_flow_and_dynamic_axes(exported: tuple[Path, Path]) -> None:
    _, folder = exported
    model = onnx.load(str(folder / "model.onnx"))
    assert control_flow_nodes(model) == []
    assert {n.op_type for n in model.graph.node}.isdisjoint({"If", "Loop", "Scan"})
    inputs = {i.name: i for i in model.graph.input}
    for spec in INPUTS:
        dims = [d.dim_param or d.dim_value for d in inputs[spec.name].type.tensor_type.shape.dim]
        assert all(isinstance(d, str) and d for d in dims), dims  # both axes symbolic
        assert inputs[spec.name].type.tensor_type.elem_type == onnx.TensorProto.INT64
    (output,) = model.graph.output
    assert output.name == SENTENCE_OUTPUT.name
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_graph_carries_no_stack_traces_or_local_paths(exported: tuple[Path, Path]) -> None:
    _, folder = exported
    for path in folder.glob("*.onnx"):
        model = onnx.load(str(path))
        annotated = [n.name for n in model.graph.node if n.metadata_props or n.doc_string]
        assert annotated == [], f"{path.name}: {annotated[:3]}"
        data = path.read_bytes()
        assert b"stack_trace" not in data and str(Path(__file__).parents[1]).encode() not in data


def test_manifest_records_contract_checksums_and_validation(exported: tuple[Path, Path]) -> None:
    _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "deberta-onnx"
    assert manifest["source"]["random_weights"] is True
    assert manifest["model"]["hidden_size"] == 32
    assert manifest["model"]["max_sequence_length"] == 512
    assert manifest["model"]["pooling"] == "mean"
    assert manifest["graph"]["outputs"][0]["dims"] == ["batch", 32]
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(folder / name)
        assert entry["bytes"] == (folder / name).stat().st_size
    report = manifest["variants"]["fp32"]["validation"]
    assert report["passed"] is True
    assert report["worst"]["max_abs_diff"] <= 1e-4
    shapes = {(row["batch"], row["sequence"]) for row in report["shapes"]}
    assert (16, 512) in shapes and (1, 1) in shapes and (2, 8) not in shapes
    assert all(row["finite"] for row in report["shapes"])
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest["versions"])


def test_existing_output_is_refused_then_overwritten(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    config = ExportConfig(quiet=True, validation_shapes=((2, 5),))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_model(tiny_checkpoint, out, config)
    assert (out / "keep.txt").read_text() == "precious"
    export_model(tiny_checkpoint, out, ExportConfig(quiet=True, overwrite=True, validation_shapes=((2, 5),)))
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or retired folders left


def test_failed_validation_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A tolerance no fp32 graph meets: no relative part, and no allowance for PyTorch fp32's own rounding (the
    # float64 comparison would otherwise pass a graph as close to the exact result as PyTorch is).
    monkeypatch.setattr("deberta_onnx.export._validate.ROUNDING_FACTOR", 0.0)
    out = tmp_path / "model"
    with pytest.raises(ValidationError, match=r"\|diff\| up to .* exceeds atol 1e-30 \+ rtol 0 .* at batch \d+ x "
                                              r"sequence \d+") as caught:
        export_model(tiny_checkpoint, out, ExportConfig(quiet=True, atol=1e-30, rtol=0.0,
                                                        validation_shapes=((3, 9), (1, 4))))
    assert caught.value.report["passed"] is False
    assert caught.value.report["worst"]["max_abs_diff"] > 1e-30
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2' model .*DebertaV2Model"):
        export_model(tmp_path / "gpt2", tmp_path / "out", ExportConfig(quiet=True))
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from deberta_onnx.export import CheckpointError

    with pytest.raises(CheckpointError, match="no config.json"):
        export_model(tmp_path, tmp_path / "out", ExportConfig(quiet=True))


def test_all_padding_rows_give_zeros_not_nan(tiny_model: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_model / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 50, 60, 2], [0, 0, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.int64)
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert np.isfinite(out).all()
    assert np.array_equal(out[1], np.zeros(out.shape[1], dtype=np.float32))


def test_deberta_v1_exports_and_validates(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from transformers import DebertaConfig, DebertaModel

    src = tmp_path / "v1"
    config = DebertaConfig(vocab_size=4000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, relative_attention=True, max_relative_positions=64,
                           pos_att_type=["c2p", "p2c"], position_biased_input=False, type_vocab_size=0)
    torch.manual_seed(0)
    DebertaModel(config).save_pretrained(src)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, src / name)
    result = export_model(src, tmp_path / "out", ExportConfig(quiet=True))
    assert result.manifest["source"]["architecture"] == "DebertaModel"
    assert result.manifest["variants"]["fp32"]["validation"]["passed"] is True
    assert control_flow_nodes(onnx.load(str(tmp_path / "out" / "model.onnx"))) == []


def test_missing_extra_module_is_named_from_the_package_metadata() -> None:
    # The export extra's list comes from pyproject.toml (through the installed metadata), so a missing module
    # that no hand-written list named (tqdm, used by validation) is reported before anything else is imported.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tqdm":
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, _Block())
        import deberta_onnx.export
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    # MissingExtraError, an ImportError, so that `except ImportError` still catches it.
    assert message.startswith("deberta_onnx.runtime.errors.MissingExtraError: deberta_onnx.export needs tqdm,"), message
    assert "pip install 'deberta-onnx[export]'" in message and "pip install torch==2.13.0" in message
