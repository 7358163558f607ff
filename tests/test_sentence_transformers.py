"""sentence-transformers checkpoints: the export reads modules.json, the Pooling and Normalize modules and the
maximum length, and the runtime's vectors equal sentence-transformers' own ``encode``.

The checkpoints are built here from the tiny DeBERTa checkpoint, in the layout sentence-transformers saves
today and in the older one (legacy pooling flags, the Transformer in a subfolder, max_seq_length in
sentence_bert_config.json)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder

from .conftest import HARD_TEXTS

CASES = {
    "cls-normalize": ("cls", True),
    "max": ("max", False),
    "mean-legacy": ("mean", False),
}
LEGACY_MAX_SEQ_LENGTH = 64


def _save_current(checkpoint: Path, out: Path, pooling: str, normalize: bool) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = modules.Transformer(str(checkpoint), max_seq_length=128)
        stack = [transformer, modules.Pooling(32, pooling_mode=pooling)]
        if normalize:
            stack.append(modules.Normalize())
        SentenceTransformer(modules=stack, device="cpu").save(str(out))
    return out


def _write_legacy(checkpoint: Path, out: Path) -> Path:
    """The layout of older sentence-transformers releases, written by hand."""
    shutil.copytree(checkpoint, out / "0_Transformer")
    (out / "0_Transformer" / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": LEGACY_MAX_SEQ_LENGTH, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    return out


# The quick tier (``-m "not slow"``) takes the legacy layout alone; the full suite each case.
@pytest.fixture(scope="module", params=[case if case == "mean-legacy" else pytest.param(case, marks=pytest.mark.slow)
                                        for case in sorted(CASES)])
def st_case(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[str, Path, Path]:
    """(case, sentence-transformers folder, exported folder)."""
    from deberta_onnx.export import ExportConfig, export_model

    pooling, normalize = CASES[request.param]
    base = tmp_path_factory.mktemp(f"st-{request.param}")
    if request.param.endswith("legacy"):
        st_dir = _write_legacy(tiny_checkpoint, base / "st")
        # The checkpoint has spm.model; sentence-transformers tokenizes with transformers' tokenizer, so take
        # that one for byte-exact agreement on every text (docs/export.md, "Tokenization").
        config = ExportConfig(quiet=True, tokenizer="transformers")
    else:
        st_dir = _save_current(tiny_checkpoint, base / "st", pooling, normalize)
        config = ExportConfig(quiet=True)
    out = base / "model"
    export_model(st_dir, out, config)
    return request.param, st_dir, out


def _texts(corpus: list[str]) -> list[str]:
    return HARD_TEXTS + corpus[:25] + ["a fairly long text " * 40]


def test_vectors_equal_sentence_transformers_encode(st_case: tuple[str, Path, Path], corpus: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    _, st_dir, folder = st_case
    texts = _texts(corpus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = SentenceTransformer(str(st_dir), device="cpu").encode(texts, batch_size=8, convert_to_numpy=True)
    actual = Encoder(folder).encode(texts, batch_size=8)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_manifest_records_the_modules(st_case: tuple[str, Path, Path]) -> None:
    case, st_dir, folder = st_case
    pooling, normalize = CASES[case]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["pooling"] == pooling and manifest["model"]["normalize"] is normalize
    recorded = manifest["source"]["sentence_transformers"]
    assert recorded["modules"] == ["Transformer", "Pooling", *(["Normalize"] if normalize else [])]
    assert manifest["source"]["model"] == str(st_dir)
    expected_length = LEGACY_MAX_SEQ_LENGTH if case.endswith("legacy") else 128
    assert manifest["model"]["max_sequence_length"] == expected_length


def _modules(folder: Path, entries: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
         for i, (kind, path) in enumerate(entries)]))


def test_unsupported_modules_and_poolings_are_refused(tmp_path: Path) -> None:
    from deberta_onnx.export import ExportConfig, UnsupportedModelError, export_model

    dense = tmp_path / "dense"
    _modules(dense, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense")])
    with pytest.raises(UnsupportedModelError, match="module\\(s\\) Dense"):
        export_model(dense, tmp_path / "out", ExportConfig(quiet=True))

    both = tmp_path / "both"
    _modules(both, [("Transformer", ""), ("Pooling", "1_Pooling")])
    (both / "1_Pooling").mkdir()
    (both / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}))
    with pytest.raises(UnsupportedModelError, match="pooling max \\+ mean"):
        export_model(both, tmp_path / "out", ExportConfig(quiet=True))

    weighted = tmp_path / "weighted"
    _modules(weighted, [("Transformer", ""), ("Pooling", "1_Pooling")])
    (weighted / "1_Pooling").mkdir()
    (weighted / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(UnsupportedModelError, match="pooling weightedmean"):
        export_model(weighted, tmp_path / "out", ExportConfig(quiet=True))
    assert not (tmp_path / "out").exists()


def test_contradicting_the_checkpoint_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from deberta_onnx.export import ExportConfig, ExportError, export_model

    st_dir = _save_current(tiny_checkpoint, tmp_path / "st", "cls", True)
    with pytest.raises(ExportError, match="pooling=cls; pooling=mean would give other vectors"):
        export_model(st_dir, tmp_path / "out", ExportConfig(quiet=True, pooling="mean"))
    with pytest.raises(ExportError, match="normalize=True; normalize=False"):
        export_model(st_dir, tmp_path / "out", ExportConfig(quiet=True, normalize=False))
    assert not (tmp_path / "out").exists()
