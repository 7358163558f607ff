"""Multiple choice and fill-mask: the graphs' contract, parity with PyTorch's ``DebertaV2ForMultipleChoice`` and
transformers' ``fill-mask`` pipeline on tiny random checkpoints, the lower precisions under the quality gate (also
on the outlier fixture), the MLM-head check, and the pure helpers on hand-built arrays."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deberta_onnx.runtime import EncoderConfig, FillMask, MultipleChoice
from deberta_onnx.runtime.errors import TaskMismatchError
from deberta_onnx.runtime.multiple_choice import check_questions, choice_scores

from .conftest import TINY_CONFIGS, TOKENIZER_FILES, build_head_checkpoint

FP32 = EncoderConfig(precision="fp32")

QUESTIONS: list[tuple[str, list[str]]] = [
    ("The kettle boiled, so she", ["made tea.", "went swimming in the lake near the old mill.", "slept."]),
    ("Which city is the capital of France?", ["Paris", "Lyon"]),
    ("café naïve façade résumé Zürich", ["東京タワー", "emoji 😀🎉", "Ω ≈ ç √ ∫", "a"]),
    ("A prompt long enough to be cut. " * 40, ["short", "a longer choice " * 30]),
    ("Again two choices, batched with the second question", ["yes", "no"]),
]

MASKED = [
    "The capital of France is [MASK].",
    "[MASK] is a word at the start.",
    "Two [MASK] in one [MASK] text, three [MASK] even.",
    "café [MASK] façade résumé Zürich",
    "A long text " * 20 + "with a [MASK] near its end.",
]


# --- the pure helpers, on hand-built arrays -------------------------------------------------------------------------

def test_spread_choices_keeps_growing_prefixes_and_padding() -> None:
    from deberta_onnx.export._heads import spread_choices, spread_masks

    ids = np.array([[1, 7, 8, 9, 2, 0], [1, 5, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    choice_ids, choice_mask = spread_choices(ids, mask, choices=3)
    assert choice_ids.shape == choice_mask.shape == (3, 3, 6)
    assert choice_mask[0].sum(axis=1).tolist() == [1, 3, 5]
    assert choice_mask[1].sum(axis=1).tolist() == [1, 2, 3]
    assert choice_mask[2].sum() == 0 and not choice_ids[2].any()  # an all-padding row stays all padding
    assert (choice_ids[choice_mask == 0] == 0).all()
    positions = spread_masks(mask, masks=2)
    assert positions.shape == (3, 2) and positions[2].tolist() == [0, 0]
    assert ((positions[:2] >= 0) & (positions[:2] < mask[:2].sum(axis=1, keepdims=True))).all()


def test_choice_scores_and_question_checks() -> None:
    scores = choice_scores(np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32))
    assert np.allclose(scores, 0.25) and scores.dtype == np.float64  # all choices equally likely
    assert np.isclose(choice_scores(np.array([1000.0, 0.0]))[0], 1.0)  # no overflow
    assert check_questions([("q", ("a", "b"))]) == [("q", ["a", "b"])]
    with pytest.raises(ValueError, match="offers no choice"):
        check_questions([("q", [])])
    with pytest.raises(TypeError, match=r"questions\[1\]: the choices must be a list of str"):
        check_questions([("q", ["a"]), ("q", "ab")])
    with pytest.raises(TypeError, match="must be a list of"):
        check_questions("q")


@pytest.mark.parametrize("kind", [MultipleChoice, FillMask])
def test_other_engines_are_refused_before_loading(kind: Any, tmp_path: Path) -> None:
    """OpenVINO (or ``auto``, which measures [batch, sequence] calls) cannot feed these graphs' inputs."""
    for engine in ("openvino", "auto"):
        with pytest.raises(ValueError, match="runs on ONNX Runtime"):
            kind(tmp_path, config=EncoderConfig(engine=engine))


def test_a_checkpoint_without_its_mlm_head_is_refused_as_v3_discriminators_are(tmp_path: Path,
                                                                              tiny_checkpoint: Path) -> None:
    """The released DeBERTa-v3 checkpoints carry no MLM head: asked for fill-mask, the load refuses, naming the
    missing weights and the way to keep the encoder, before anything is written."""
    import transformers

    from deberta_onnx.export import UnsupportedHeadError
    from deberta_onnx.export.testing import load_checkpoint

    settings = {key: value for key, value in TINY_CONFIGS["v3-shared"].items() if key != "position_buckets"}
    transformers.DebertaV2Model(transformers.DebertaV2Config(**settings)).save_pretrained(tmp_path / "v3")
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, tmp_path / "v3" / name)
    with pytest.raises(UnsupportedHeadError) as caught:
        load_checkpoint(str(tmp_path / "v3"), task="fill-mask")
    message = str(caught.value)
    assert "no trained masked-LM head" in message and "replaced-token-detection" in message
    assert "--task embedding" in message and "cls.predictions" in message


def test_the_original_mlm_layout_loads_under_a_legacy_config(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """DeBERTa's own checkpoints keep the head as ``lm_predictions.lm_head``; a config that asks for transformers'
    legacy layout (the default) would leave it unread and random. The loader reads it in the layout it was saved."""
    import torch

    from deberta_onnx.export.testing import load_checkpoint

    src = build_head_checkpoint(tiny_checkpoint, tmp_path / "mlm", head="fill-mask")
    config = json.loads((src / "config.json").read_text())
    config["legacy"] = True
    (src / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(str(src))
    assert loaded.task == "fill-mask" and not loaded.model.legacy
    from safetensors.torch import load_file

    saved = load_file(str(src / "model.safetensors"))
    torch.testing.assert_close(loaded.model.lm_predictions.lm_head.dense.weight,
                               saved["lm_predictions.lm_head.dense.weight"], rtol=0, atol=0)


# --- multiple choice ------------------------------------------------------------------------------------------------

def _pytorch_choices(src: Path, questions: list[tuple[str, list[str]]]) -> list[np.ndarray]:
    """PyTorch's DebertaV2ForMultipleChoice + softmax, one question at a time, tokenized as the model card shows."""
    import torch
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForMultipleChoice.from_pretrained(src).eval()
    out = []
    for prompt, choices in questions:
        encoded = tokenizer([prompt] * len(choices), choices, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{key: value.unsqueeze(0) for key, value in encoded.items()}).logits
        out.append(logits.softmax(-1)[0].numpy())
    return out


@pytest.mark.slow
def test_multiple_choice_graph_contract(multiple_choice: tuple[Path, Path]) -> None:
    _, folder = multiple_choice
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["task"] == "multiple-choice" and not manifest["model"].get("labels")
    assert manifest["variants"]["fp32"]["validation"]["passed"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_ids", ["batch", "choices", "sequence"]), ("attention_mask", ["batch", "choices", "sequence"])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", "choices"])]


@pytest.mark.slow
def test_multiple_choice_matches_pytorch(multiple_choice: tuple[Path, Path]) -> None:
    src, folder = multiple_choice
    model = MultipleChoice(folder, config=FP32)
    results = model.predict(QUESTIONS)
    alone = [model.predict(prompt, choices) for prompt, choices in QUESTIONS]
    one_per_call = model.predict(QUESTIONS, batch_size=1)
    for result, expected, single, unbatched, (prompt, choices) in zip(
            results, _pytorch_choices(src, QUESTIONS), alone, one_per_call, QUESTIONS):
        assert result.prompt == prompt and result.choices == choices
        np.testing.assert_allclose(result.scores, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(single.scores, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(unbatched.scores, expected, atol=1e-4, rtol=0)
        assert result.best == int(np.argmax(expected)) and result.answer == choices[result.best]
    assert model.token_count(QUESTIONS[:2]) == [sum(n) for n in (
        [len(e.ids) for e in model.loaded.tokenizer.encodings([(QUESTIONS[i][0], c) for c in QUESTIONS[i][1]])]
        for i in range(2))]


@pytest.mark.slow
def test_multiple_choice_refuses_bad_calls_and_other_folders(multiple_choice: tuple[Path, Path],
                                                             fill_mask: tuple[Path, Path]) -> None:
    model = MultipleChoice(multiple_choice[1], config=FP32)
    with pytest.raises(TypeError, match="give the choices"):
        model.predict("a prompt")
    with pytest.raises(ValueError, match="choices go with a single prompt"):
        model.predict([("q", ["a"])], ["b"])
    with pytest.raises(ValueError, match="longer than the model's maximum"):
        model.predict("word " * 600, ["a", "b"], truncate=False)
    with pytest.raises(TaskMismatchError, match="load it with FillMask"):
        MultipleChoice(fill_mask[1])


# --- fill-mask ------------------------------------------------------------------------------------------------------

def _pipeline(src: Path) -> Any:
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipeline("fill-mask", model=str(src), device="cpu")


def _same(ours: Any, theirs: Any) -> None:
    """Equal structure, tokens, token strings and sequences; scores within 1e-4."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs)
        assert (ours["token"], ours["token_str"], ours["sequence"]) == (
            theirs["token"], theirs["token_str"], theirs["sequence"])
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
        return
    assert isinstance(ours, list) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        _same(a, b)


@pytest.mark.slow
def test_fill_mask_graph_scores_the_masked_positions_only(fill_mask: tuple[Path, Path]) -> None:
    _, folder = fill_mask
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["task"] == "fill-mask" and manifest["model"]["mask_token"] == "[MASK]"
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"]),
        ("mask_positions", ["batch", "masks"])]
    (output,) = session.get_outputs()
    assert output.name == "logits" and output.shape[:2] == ["batch", "masks"]
    assert output.shape[2] == manifest["model"]["vocab_size"]  # no sequence axis: [B, S, vocab] never leaves
    # The graph's scores at two positions are the full model's scores there.
    import torch
    from transformers import AutoModelForMaskedLM

    ids = np.array([[1, 50, 60, 70, 80, 2]], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.array([[4, 2]], dtype=np.int64)
    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "mask_positions": positions})
    with torch.no_grad():
        full = AutoModelForMaskedLM.from_pretrained(fill_mask[0]).eval()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits[0], full[0, [4, 2]], atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_fill_mask_matches_the_transformers_pipeline(fill_mask: tuple[Path, Path]) -> None:
    src, folder = fill_mask
    pipe = _pipeline(src)
    model = FillMask(folder, config=FP32)
    for text in MASKED:
        _same(model(text), pipe(text))
        _same(model(text, top_k=2), pipe(text, top_k=2))
    _same(model(MASKED), pipe(MASKED))  # a list: one answer per text, batched here
    _same(model(MASKED[:1]), pipe(MASKED[:1]))  # a list of one gives that text's answer alone
    targets = ["city", "▁the", "capital", "zzqx", "[MASK]", "city"]
    _same(model(MASKED[0], targets=targets, top_k=10), pipe(MASKED[0], targets=targets, top_k=10))
    _same(model(MASKED[2], targets="▁the", top_k=3), pipe(MASKED[2], targets="▁the", top_k=3))
    _same(model(MASKED, batch_size=2, top_k=1), pipe(MASKED, top_k=1))


@pytest.mark.slow
def test_fill_mask_refuses_texts_without_a_mask(fill_mask: tuple[Path, Path]) -> None:
    model = FillMask(fill_mask[1], config=FP32)
    with pytest.raises(ValueError, match=r"texts\[1\] has no mask token \[MASK\]"):
        model(["a [MASK].", "no mask here"])
    with pytest.raises(ValueError, match="cut off"):
        model("word " * 600 + "[MASK]")
    with pytest.raises(ValueError, match="give no token"):
        model("a [MASK].", targets=[""])
    with pytest.raises(ValueError, match="top_k"):
        model("a [MASK].", top_k=0)


# --- the lower precisions under the quality gate ----------------------------------------------------------------------

def _export_precisions(src: Path, out: Path, precisions: tuple[str, ...], **options: Any) -> dict[str, Any]:
    from deberta_onnx.export import ExportConfig, export_model

    config = ExportConfig(quiet=True, tokenizer="transformers", precisions=("fp32", *precisions),
                          validation_shapes=((2, 7), (3, 33)), **options)
    return export_model(src, out, config).manifest


@pytest.mark.slow
def test_fill_mask_precisions_pass_the_gate_on_the_masked_scores(fill_mask: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    src, _ = fill_mask
    manifest = _export_precisions(src, tmp_path / "model", ("fp16", "int8-dynamic"))
    for precision, threshold in (("fp16", 0.999), ("int8-dynamic", 0.99)):
        quality = manifest["variants"][precision]["quality"]
        assert quality["passed"] and quality["min_cosine"] >= threshold and quality["threshold"] == threshold
    reference = FillMask(tmp_path / "model", config=FP32)
    for precision in ("fp16", "int8-dynamic"):
        lower = FillMask(tmp_path / "model", config=EncoderConfig(precision=precision))
        for text in MASKED[:3]:
            ours, theirs = lower(text, top_k=1), reference(text, top_k=1)
            assert [c["token"] for c in np.ravel(ours)] == [c["token"] for c in np.ravel(theirs)]


@pytest.mark.slow
def test_multiple_choice_precisions_under_the_gate(multiple_choice: tuple[Path, Path], tmp_path: Path) -> None:
    """fp16 passes on the choices' logits; int8-dynamic moves them more than the gate allows on this model and is
    refused, with nothing written."""
    from deberta_onnx.export import QualityGateError

    src, _ = multiple_choice
    manifest = _export_precisions(src, tmp_path / "fp16", ("fp16",))
    quality = manifest["variants"]["fp16"]["quality"]
    assert quality["passed"] and quality["min_cosine"] >= 0.999
    fp16 = MultipleChoice(tmp_path / "fp16", config=EncoderConfig(precision="fp16")).predict(QUESTIONS)
    for ours, expected in zip(fp16, _pytorch_choices(src, QUESTIONS)):
        np.testing.assert_allclose(ours.scores, expected, atol=2e-3, rtol=0)
    with pytest.raises(QualityGateError, match="int8-dynamic failed the quality gate"):
        _export_precisions(src, tmp_path / "int8", ("int8-dynamic",), fallback=False)
    assert not (tmp_path / "int8").exists()


@pytest.fixture(scope="module")
def outlier_encoder(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    from deberta_onnx.export.testing import OutlierSpec, build_random_checkpoint

    return build_random_checkpoint(TINY_CONFIGS["v3-shared"], tmp_path_factory.mktemp("outliers"), texts=corpus,
                                   seed=1, outliers=OutlierSpec())


@pytest.mark.slow
def test_fill_mask_precisions_on_the_outlier_fixture(outlier_encoder: Path, tmp_path: Path) -> None:
    """A masked LM on an encoder with trained models' activation outliers: fp32 validates, and fp16 and int8-dynamic
    keep the masked positions' scores above their thresholds."""
    src = build_head_checkpoint(outlier_encoder, tmp_path / "ckpt", head="fill-mask", encoder=outlier_encoder)
    manifest = _export_precisions(src, tmp_path / "model", ("fp16", "int8-dynamic"))
    variants = manifest["variants"]
    assert variants["fp32"]["validation"]["passed"]
    for precision, threshold in (("fp16", 0.999), ("int8-dynamic", 0.99)):
        assert variants[precision]["quality"]["passed"] and variants[precision]["quality"]["min_cosine"] >= threshold


@pytest.mark.slow
def test_multiple_choice_gate_refuses_fp16_on_the_outlier_fixture(outlier_encoder: Path, tmp_path: Path) -> None:
    """On the outlier encoder (its weights as built, so its choices' logits differ little) fp16 moves the centred
    choice logits past the gate with every fp16 recipe: the export refuses, names the worst held-out sentence, and
    writes nothing."""
    from deberta_onnx.export import QualityGateError

    src = build_head_checkpoint(outlier_encoder, tmp_path / "ckpt", head="multiple-choice", encoder=outlier_encoder)
    with pytest.raises(QualityGateError, match=r"fp16 failed the quality gate .* worst: held-out sentence \d+"):
        _export_precisions(src, tmp_path / "model", ("fp16",))
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_cli_commands_print_the_library_answers(multiple_choice: tuple[Path, Path], fill_mask: tuple[Path, Path],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    questions = tmp_path / "questions.tsv"
    questions.write_text("".join(f"{p}\t" + "\t".join(c) + "\n" for p, c in QUESTIONS[:2]), encoding="utf-8")
    assert main(["multiple-choice", str(multiple_choice[1]), "--input", str(questions), "--precision", "fp32"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, result in zip(printed, MultipleChoice(multiple_choice[1], config=FP32).predict(QUESTIONS[:2])):
        assert row["answer"] == result.answer and row["scores"] == pytest.approx(result.scores, abs=1e-6)
    masked = tmp_path / "masked.txt"
    masked.write_text("\n".join(MASKED[:3]) + "\n", encoding="utf-8")
    assert main(["fill-mask", str(fill_mask[1]), "--input", str(masked), "--top-k", "2", "--targets", "city,▁the",
                 "--precision", "fp32"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == json.loads(json.dumps(FillMask(fill_mask[1], config=FP32)(
        MASKED[:3], top_k=2, targets=["city", "▁the"])))
    assert main(["classify", str(fill_mask[1]), "--input", str(masked)]) == 1
    assert "use `deberta-onnx fill-mask`" in capsys.readouterr().err
    assert main(["serve", str(multiple_choice[1]), "--engine", "openvino", "--port", "0"]) == 1  # before binding
    assert "MultipleChoice runs on ONNX Runtime" in capsys.readouterr().err
    # info names the task, and its load check (the graph against the manifest, on the CPU) passes for both graphs.
    assert main(["info", str(multiple_choice[1])]) == 0
    assert "task:       multiple-choice (MultipleChoice" in capsys.readouterr().out
    assert main(["info", str(fill_mask[1])]) == 0
    assert "task:       fill-mask (FillMask; `deberta-onnx fill-mask`)   mask token: [MASK]" in capsys.readouterr().out
