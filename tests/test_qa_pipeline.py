"""``QuestionAnswerer`` against transformers' own ``question-answering`` pipeline, where transformers still has it
(4.x: the export-floor job of .ci/compat runs this file; transformers 5 removed the pipeline, and the main suite
compares with the port in tests/reference.py instead). Answers, offsets identical, scores within 1e-4."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import transformers
from packaging.version import Version

if Version(transformers.__version__) >= Version("5"):
    pytest.skip(f"transformers {transformers.__version__} has no question-answering pipeline (removed in 5); "
                "test_question_answering.py compares with a port of it", allow_module_level=True)

from deberta_onnx.runtime import QuestionAnswerer

from .conftest import build_classifier_checkpoint


def test_answers_equal_transformers_pipeline(tiny_checkpoint: Path, corpus: list[str], tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering, PreTrainedTokenizerFast, pipeline

    from deberta_onnx.export import ExportConfig, export_model

    src = build_classifier_checkpoint(tiny_checkpoint, tmp_path / "ckpt", task="question-answering",
                                      labels=["LABEL_0", "LABEL_1"], seed=7)
    out = tmp_path / "model"
    export_model(src, out, ExportConfig(quiet=True, tokenizer="transformers", validation_shapes=((2, 7),)))
    # transformers 4.x cannot read a tokenizer_config.json written by 5.x; it builds the same fast tokenizer from
    # tokenizer.json alone.
    folder = tmp_path / "fast"
    folder.mkdir()
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), cls_token="[CLS]",
                                        sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                        mask_token="[MASK]", model_max_length=512)
    model = AutoModelForQuestionAnswering.from_pretrained(src).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = pipeline("question-answering", model=model, tokenizer=tokenizer)
    answerer = QuestionAnswerer(out)
    cases = [("What does it say?", corpus[3]), ("Who did it?", " ".join(corpus[10:15])),
             ("Where is the answer in the long one?", " ".join(corpus[40:100]))]
    for options in ({}, {"top_k": 3, "handle_impossible_answer": True}):
        for question, context in cases:
            expected = reader(question=question, context=context, **options)
            expected = expected if isinstance(expected, list) else [expected]
            ours = answerer.answer(question, context, **options)
            ours = ours if isinstance(ours, list) else [ours]
            assert [(a["start"], a["end"], a["answer"]) for a in ours] == [
                (a["start"], a["end"], a["answer"]) for a in expected]
            np.testing.assert_allclose([a["score"] for a in ours], [a["score"] for a in expected], atol=1e-4, rtol=0)
