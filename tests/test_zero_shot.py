"""Zero-shot classification through NLI: ``ZeroShotClassifier`` against transformers' zero-shot-classification
pipeline on the tiny NLI checkpoint (labels in the same order, scores within 1e-4), the score rules on hand-built
logits, the entailment label read from the checkpoint, and the classify command's zero-shot mode."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deberta_onnx.runtime import ZeroShotClassifier, ZeroShotResult
from deberta_onnx.runtime.cli import main
from deberta_onnx.runtime.errors import TaskMismatchError
from deberta_onnx.runtime.zero_shot import (
    entailment_index,
    hypotheses,
    label_order,
    parse_candidate_labels,
    zero_shot_scores,
)

from .conftest import HARD_TEXTS

TEXTS = ["The match went to extra time and the home side won on penalties.",
         "Parliament passed the budget after a long night of debate.",
         "Stir the onions until golden, then add the garlic.", *HARD_TEXTS[:6]]
LABELS = ["sports", "politics", "cooking", "science and technology"]


def _pipeline(src: Path) -> Any:
    from transformers import pipeline

    return pipeline("zero-shot-classification", model=str(src), tokenizer=str(src), device="cpu")


def _assert_same(ours: list[ZeroShotResult], theirs: list[dict[str, Any]]) -> None:
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert mine.sequence == reference["sequence"]
        by_label = dict(zip(reference["labels"], reference["scores"]))
        assert sorted(mine.labels) == sorted(by_label)
        np.testing.assert_allclose(mine.scores, [by_label[label] for label in mine.labels], atol=1e-4, rtol=0)
        # The order is the pipeline's wherever the pipeline's own scores tell the labels apart beyond fp32 noise.
        gaps = np.abs(np.diff(reference["scores"]))
        if (gaps > 1e-4).all():
            assert mine.labels == reference["labels"]


@pytest.mark.parametrize("multi_label", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_zero_shot_equals_the_transformers_pipeline(nli: tuple[Path, Path], multi_label: bool) -> None:
    src, folder = nli
    classifier = ZeroShotClassifier(folder)
    pipe = _pipeline(src)
    _assert_same(classifier.predict(TEXTS, LABELS, multi_label=multi_label),
                 pipe(TEXTS, LABELS, multi_label=multi_label))
    # A comma-separated str of labels, a template of one's own, one text, one label.
    template = "Dieser Text handelt von {}."
    ours = classifier.predict(TEXTS[0], "sports, politics,,cooking", hypothesis_template=template,
                              multi_label=multi_label)
    assert isinstance(ours, ZeroShotResult)
    _assert_same([ours], [pipe(TEXTS[0], "sports, politics,,cooking", hypothesis_template=template,
                               multi_label=multi_label)])
    _assert_same(classifier.predict(TEXTS[:3], ["sports"]), pipe(TEXTS[:3], ["sports"]))
    if not multi_label:
        np.testing.assert_allclose(classifier.scores(TEXTS, LABELS).sum(axis=1), 1.0, rtol=1e-9)


def test_zero_shot_scores_by_hand() -> None:
    # entailment, neutral, contradiction
    equal = np.tile([[2.0, 0.5, -1.0]], (1, 4, 1))
    scores = zero_shot_scores(equal, entailment=0, multi_label=False)
    np.testing.assert_allclose(scores, [[0.25] * 4])
    assert label_order(scores[0]) == [3, 2, 1, 0]  # equal scores: the pipeline lists the last label first
    # Entailment against contradiction only (neutral plays no part): logit gaps of log 3 and 0 give 3/4 and 1/2.
    logits = np.array([[[math.log(3), 7.0, 0.0], [0.0, -5.0, 0.0]]])
    np.testing.assert_allclose(zero_shot_scores(logits, entailment=0, multi_label=True), [[0.75, 0.5]])
    # One label is scored on its own even without multi_label; softmax across labels otherwise.
    np.testing.assert_allclose(zero_shot_scores(logits[:, :1], entailment=0, multi_label=False), [[0.75]])
    np.testing.assert_allclose(zero_shot_scores(logits, entailment=0, multi_label=False),
                               [[3 / 4, 1 / 4]])
    # Entailment in another column: contradiction is then the first one (the pipeline's rule).
    flipped = logits[..., ::-1]
    np.testing.assert_allclose(zero_shot_scores(flipped, entailment=2, multi_label=True), [[0.75, 0.5]])
    # Logits far outside exp's range stay finite.
    huge = np.array([[[1000.0, 0.0, -1000.0], [999.0, 0.0, 0.0]]])
    np.testing.assert_allclose(zero_shot_scores(huge, entailment=0, multi_label=False),
                               [[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]])
    with pytest.raises(ValueError, match="texts, labels, classes"):
        zero_shot_scores(np.zeros((2, 3)), entailment=0, multi_label=False)


def test_labels_templates_and_the_entailment_label() -> None:
    assert parse_candidate_labels(" a , b,,c ") == ["a", "b", "c"]
    assert parse_candidate_labels(["a, b"]) == ["a, b"]
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        parse_candidate_labels(" , ")
    with pytest.raises(TypeError, match="candidate_labels must be"):
        parse_candidate_labels([1, 2])  # type: ignore[list-item]
    assert hypotheses(["x"], "About {}!") == ["About x!"]
    with pytest.raises(ValueError, match="has no \\{\\} for the label"):
        hypotheses(["x"], "About it.")
    with pytest.raises(ValueError, match="not a format string"):
        hypotheses(["x"], "About {label}.")
    assert entailment_index(["contradiction", "neutral", "Entailment"]) == 2
    assert entailment_index(["entailment", "not_entailment"]) == 0
    with pytest.raises(TaskMismatchError, match="none of which starts with 'entail'.*NLI"):
        entailment_index(["LABEL_0", "LABEL_1"])


def test_a_classifier_without_entailment_is_refused(reranker: tuple[Path, Path], ner: tuple[Path, Path],
                                                    tiny_model: Path) -> None:
    with pytest.raises(TaskMismatchError, match=r"labels \['LABEL_0'\], none of which starts with 'entail'"):
        ZeroShotClassifier(reranker[1])
    for folder in (ner[1], tiny_model):
        with pytest.raises(TaskMismatchError, match="which ZeroShotClassifier cannot run"):
            ZeroShotClassifier(folder)


def test_a_texts_labels_run_in_one_model_call(nli: tuple[Path, Path]) -> None:
    """Forty labels of one text: one model call (the default batch grows to hold them), as many as the pipeline
    would make with batch_size=40; with a batch size of ten, four."""
    classifier = ZeroShotClassifier(nli[1])
    labels = [f"topic {i}" for i in range(40)]
    pairs = classifier.pairs(TEXTS[0], labels)
    assert pairs[:2] == [(TEXTS[0], "This example is topic 0."), (TEXTS[0], "This example is topic 1.")]
    runs = []
    runner = classifier.loaded.runner
    original = runner.run

    def counted(*args: Any) -> Any:
        runs.append(args[0].shape[0])
        return original(*args)

    runner.run = counted  # type: ignore[method-assign]
    try:
        default = classifier.scores(TEXTS[0], labels)
        assert runs == [40]
        runs.clear()
        np.testing.assert_allclose(classifier.scores(TEXTS[0], labels, batch_size=10), default, atol=1e-6)
        assert runs == [10, 10, 10, 10]
    finally:
        runner.run = original  # type: ignore[method-assign]


def test_classify_command_zero_shot(nli: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS[:3]), encoding="utf-8")
    assert main(["classify", str(nli[1]), "--input", str(tmp_path / "texts.txt"), "--candidate-labels",
                 ",".join(LABELS), "--multi-label", "--hypothesis-template", "It is about {}."]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = ZeroShotClassifier(nli[1]).predict(TEXTS[:3], LABELS, multi_label=True,
                                                  hypothesis_template="It is about {}.")
    assert [row["labels"] for row in rows] == [result.labels for result in expected]
    np.testing.assert_allclose([row["scores"] for row in rows], [result.scores for result in expected], atol=1e-6)
    assert [row["sequence"] for row in rows] == TEXTS[:3]
    assert main(["classify", str(nli[1]), "--input", str(tmp_path / "texts.txt"), "--multi-label"]) == 1
    assert "give --candidate-labels too" in capsys.readouterr().err
    assert main(["classify", str(nli[1]), "--input", str(tmp_path / "texts.txt"), "--candidate-labels", "a",
                 "--hypothesis-template", "no placeholder"]) == 1
    assert "has no {} for the label" in capsys.readouterr().err
