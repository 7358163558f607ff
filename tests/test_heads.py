"""No head dropped in silence: every ``DebertaV2For*`` and ``DebertaFor*`` class transformers has is either exported
with its head (sequence and token classification, question answering, multiple choice, masked LM) or refused with a
message that names the head and the way to keep only the encoder (``--task embedding``); the refusal happens before
anything is written.

transformers has no DeBERTa head class left that is not exported, so the refusal is tested on a checkpoint whose
``architectures`` names a head transformers lacks (``_UNKNOWN_HEAD``: DeBERTa-v3's replaced-token-detection
discriminator, which ``AutoModel`` would load as a bare encoder), as a head added to transformers later would be."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers
from transformers import DebertaConfig, DebertaV2Config

from deberta_onnx.runtime.contract import (
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
)

from .conftest import TINY_CONFIGS

# A head no class of transformers has; its checkpoint is an encoder whose config.json names that head.
_UNKNOWN_HEAD = "DebertaV2ForReplacedTokenDetection"
# The heads that export as themselves; every other ``...For...`` class must be refused.
_EXPORTED = {"ForSequenceClassification": TASK_SEQUENCE_CLASSIFICATION,
             "ForTokenClassification": TASK_TOKEN_CLASSIFICATION,
             "ForQuestionAnswering": TASK_QUESTION_ANSWERING,
             "ForMultipleChoice": TASK_MULTIPLE_CHOICE,
             "ForMaskedLM": TASK_FILL_MASK}


def _head_classes() -> list[str]:
    """Every DeBERTa v1/v2 model class with a head that this transformers has (read from the library, so that a
    head added to transformers is covered without touching this test)."""
    names = sorted(name for name in dir(transformers) if re.fullmatch(r"Deberta(V2)?For[A-Za-z]+", name))
    assert any(name.startswith("DebertaV2For") for name in names) and any(n.startswith("DebertaFor") for n in names)
    assert _UNKNOWN_HEAD not in names
    return [*names, _UNKNOWN_HEAD]


def _tiny_head(name: str, out: Path) -> Path:
    """A tiny random checkpoint of class ``name`` saved with ``save_pretrained`` (no tokenizer: the refusal comes
    before the tokenizer is read); for ``_UNKNOWN_HEAD``, an encoder whose config.json declares that head."""
    settings = {key: value for key, value in TINY_CONFIGS["v3-shared"].items() if key != "position_buckets"}
    config_class = DebertaV2Config if name.startswith("DebertaV2") else DebertaConfig
    config = config_class(**settings, num_labels=3)
    if name == _UNKNOWN_HEAD:
        transformers.DebertaV2Model(config).save_pretrained(out)
        declared = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**declared, "architectures": [name]}))
        return out
    getattr(transformers, name)(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("name", _head_classes())
def test_every_deberta_head_is_exported_or_refused_by_name(name: str, tmp_path: Path) -> None:
    from deberta_onnx.export import ExportConfig, UnsupportedHeadError, export_model
    from deberta_onnx.export.testing import checkpoint_task

    src = _tiny_head(name, tmp_path / "ckpt")
    assert json.loads((src / "config.json").read_text())["architectures"] == [name]
    config = transformers.AutoConfig.from_pretrained(src)
    suffix = next((s for s in _EXPORTED if name.endswith(s)), None)
    if suffix is not None:
        assert checkpoint_task(config) == _EXPORTED[suffix]
        return
    out = tmp_path / "out"
    with pytest.raises(UnsupportedHeadError) as caught:
        export_model(src, out, ExportConfig(quiet=True))
    message = str(caught.value)
    assert f"is a {name} checkpoint" in message and "--task embedding" in message
    assert "keep only the encoder" in message and "ForSequenceClassification" in message
    assert not out.exists()
    # Asking for a head it lacks names the head it has.
    with pytest.raises(UnsupportedHeadError, match=re.escape(name)):
        export_model(src, out, ExportConfig(quiet=True, task=TASK_SEQUENCE_CLASSIFICATION))


def test_task_embedding_keeps_the_encoder_of_an_unsupported_head(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """``--task embedding`` on a checkpoint of an unsupported head loads its encoder, with the trained weights (the
    export of an encoder is tested on classifiers in test_classifiers.py)."""
    import shutil

    import torch

    from deberta_onnx.export.testing import load_checkpoint

    from .conftest import TOKENIZER_FILES

    src = _tiny_head(_UNKNOWN_HEAD, tmp_path / "ckpt")
    for file in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / file, src / file)
    loaded = load_checkpoint(str(src), task=TASK_EMBEDDING)
    assert loaded.task == TASK_EMBEDDING and loaded.source["architecture"] == "DebertaV2Model"
    trained = transformers.DebertaV2Model.from_pretrained(src).state_dict()
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


def test_export_command_refuses_the_head_and_names_the_way_out(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    src = _tiny_head(_UNKNOWN_HEAD, tmp_path / "ckpt")
    assert main(["export", str(src), str(tmp_path / "out"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"{_UNKNOWN_HEAD} checkpoint" in error and "--task embedding" in error
    assert not (tmp_path / "out").exists()


_TASK_FOLDERS = ["qa", pytest.param("multiple_choice", marks=pytest.mark.slow),
                 pytest.param("fill_mask", marks=pytest.mark.slow)]


@pytest.mark.parametrize("fixture", _TASK_FOLDERS)
def test_hugging_face_layout_of_the_task_graphs(fixture: str, request: pytest.FixtureRequest) -> None:
    """config.json names the head; the question-answering and multiple-choice graphs take what a tokenizer gives
    (Optimum's and transformers.js' shapes: start/end logits ``[batch, sequence]``, choices ``[batch, choices,
    sequence]``) and sit in ``onnx/`` as hard links; the fill-mask graph, which also takes ``mask_positions``, is
    left out of ``onnx/`` (a loader would call it without that input), and the manifest says why."""
    import os

    from deberta_onnx.runtime.contract import HUB_ONNX_DIR, MASK_POSITIONS, TASKS
    from deberta_onnx.runtime.manifest import load_manifest

    folder = request.getfixturevalue(fixture)[1]
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    task = manifest["model"]["task"]
    assert task in TASKS and task == load_manifest(folder).task
    head = {v: k for k, v in _EXPORTED.items()}[task]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [f"DebertaV2{head}"]
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["model_input_names"] == [name for name in (s["name"] for s in manifest["graph"]["inputs"])
                                             if name != MASK_POSITIONS]
    hub = manifest["hub"]
    assert hub["pad_token"] == settings["pad_token"] == "[PAD]" and hub["config"] == "config.json"
    if task == TASK_FILL_MASK:
        assert not (folder / HUB_ONNX_DIR).exists() and hub["files"] == {}
        assert MASK_POSITIONS in hub["onnx_left_out"] and "mask_positions" not in settings["model_input_names"]
    else:
        assert "onnx_left_out" not in hub
        assert os.path.samefile(folder / HUB_ONNX_DIR / "model.onnx", folder / "model.onnx")
        assert hub["files"] == {f"{HUB_ONNX_DIR}/model.onnx": "model.onnx"}
