"""Extractive question answering: the exported head (start and end logits over the shape grid), ``QuestionAnswerer``
against a port of transformers 4.x's ``question-answering`` pipeline (tests/reference.py) on the PyTorch model's
logits, hand-built logits for the edge logic, and the lower precisions under the gate (on the outlier checkpoint
too). The comparison with the real pipeline, where transformers still has it, is tests/test_qa_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deberta_onnx.runtime import EncoderConfig, QuestionAnswerer
from deberta_onnx.runtime.contract import END_LOGITS, START_LOGITS, TASK_QUESTION_ANSWERING
from deberta_onnx.runtime.question_answering import AnswerOptions, Window, pick_answers

from .reference import reference_answers


def _same(ours: Any, reference: list[dict[str, Any]]) -> None:
    """Answers, offsets and texts identical, scores within 1e-4."""
    ours = ours if isinstance(ours, list) else [ours]
    assert [(a["start"], a["end"], a["answer"]) for a in ours] == [
        (r["start"], r["end"], r["answer"]) for r in reference]
    np.testing.assert_allclose([a["score"] for a in ours], [r["score"] for r in reference], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def torch_qa(qa: tuple[Path, Path]) -> tuple[Any, Any]:
    """transformers' model and fast tokenizer of the tiny QA checkpoint."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    return AutoModelForQuestionAnswering.from_pretrained(qa[0]).eval(), AutoTokenizer.from_pretrained(qa[0])


@pytest.fixture(scope="module")
def answerer(qa: tuple[Path, Path]) -> QuestionAnswerer:
    return QuestionAnswerer(qa[1])


def _contexts(corpus: list[str]) -> list[tuple[str, str]]:
    """(question, context) pairs: one sentence, a paragraph, and a context of several 384-token windows."""
    return [("What does it say?", corpus[3]), ("Who did it, and when?", " ".join(corpus[10:15])),
            ("Where is the answer in the long one?", " ".join(corpus[40:110]))]


def test_export_writes_start_and_end_logits(qa: tuple[Path, Path]) -> None:
    manifest = json.loads((qa[1] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model"]["task"] == TASK_QUESTION_ANSWERING
    assert manifest["source"]["architecture"] == "DebertaV2ForQuestionAnswering"
    outputs = {spec["name"]: spec["dims"] for spec in manifest["graph"]["outputs"]}
    assert outputs == {START_LOGITS: ["batch", "sequence"], END_LOGITS: ["batch", "sequence"]}
    report = manifest["variants"]["fp32"]["validation"]
    assert report["passed"] and {row["worst_output"] for row in report["shapes"]} <= {START_LOGITS, END_LOGITS}
    assert len(report["shapes"]) == 8  # the whole default grid, padded rows included


_MORE_OPTIONS = ({"max_seq_len": 48, "doc_stride": 16, "top_k": 2}, {"top_k": 3},
                 {"handle_impossible_answer": True, "top_k": 2}, {"align_to_words": False, "max_answer_len": 4})


@pytest.mark.parametrize("options", [{}, *(pytest.param(o, marks=pytest.mark.slow) for o in _MORE_OPTIONS)])
def test_answers_equal_the_pipeline_port(answerer: QuestionAnswerer, torch_qa: tuple[Any, Any],
                                         corpus: list[str], options: dict[str, Any]) -> None:
    model, tokenizer = torch_qa
    pairs = _contexts(corpus)
    ours = answerer.answer([q for q, _ in pairs], [c for _, c in pairs], **options)
    assert len(answerer.windows(*pairs[2])) > 2  # the long context runs as several windows
    for pair, found in zip(pairs, ours):
        _same(found, reference_answers(model, tokenizer, *pair, **options))


def test_one_question_gives_one_answer_and_windows_share_batches(answerer: QuestionAnswerer, corpus: list[str]
                                                                 ) -> None:
    question, context = _contexts(corpus)[2]
    one = answerer.answer(question, context)
    assert isinstance(one, dict) and context[one["start"]:one["end"]] == one["answer"]
    windows, owners = answerer.pair_windows([(question, context), ("Which?", corpus[0])])
    batches = list(answerer.plan(windows, batch_size=64))
    # Longest first, as many windows per call as the token budget allows: the long context's windows run together.
    assert sorted(row for call in batches for row in call.rows) == list(range(len(owners[0]) + 1))
    assert set(batches[0].rows) <= set(owners[0]) and len(batches[0].rows) > 1 and owners[1] == [len(owners[0])]
    assert answerer.answer([question], [context], batch_size=1) == [one]


def _windows(answerer: QuestionAnswerer, question: str, context: str, logits: Any, options: AnswerOptions
             ) -> tuple[list[Window], list[tuple[np.ndarray, np.ndarray]]]:
    """The real windows of a pair, with logits from ``logits(encoding) -> (start, end)``."""
    encodings = answerer.windows(question, context, options)
    pairs = [logits(encoding) for encoding in encodings]
    return [Window(s, e, encoding) for (s, e), encoding in zip(pairs, encodings)], pairs


def test_an_answer_across_a_window_boundary_is_found_whole(answerer: QuestionAnswerer, torch_qa: tuple[Any, Any],
                                                           corpus: list[str]) -> None:
    question, context = "Which words?", " ".join(corpus[20:40])
    # Token offsets as they are (align_to_words would widen a span that starts inside a word).
    options = answerer.options(max_seq_len=40, doc_stride=12, align_to_words=False)
    first = answerer.windows(question, context, options)[0]
    inside = [offset for offset, sequence in zip(first.offsets, first.sequence_ids) if sequence == 1]
    start_char = inside[-3][0]  # three tokens before the first window ends ...
    later = answerer.windows(question, context, options)[1]
    ahead = [offset for offset, sequence in zip(later.offsets, later.sequence_ids) if sequence == 1]
    end_char = next(offset[1] for offset in ahead if offset[0] > inside[-1][1] + 1)  # ... to past its end
    assert end_char > inside[-1][1]

    def logits(encoding: Any) -> tuple[np.ndarray, np.ndarray]:
        start, end = np.zeros(len(encoding.ids), np.float32), np.zeros(len(encoding.ids), np.float32)
        for position, ((low, high), sequence) in enumerate(zip(encoding.offsets, encoding.sequence_ids)):
            if sequence == 1:
                start[position] += 8.0 * (low == start_char)
                end[position] += 8.0 * (high == end_char)
        return start, end

    windows, raw = _windows(answerer, question, context, logits, options)
    found = pick_answers(context, windows, cls_id=answerer.cls_id, options=options)
    assert (found[0]["start"], found[0]["end"]) == (start_char, end_char)
    assert found[0]["answer"] == context[start_char:end_char]
    model, tokenizer = torch_qa
    _same(found, reference_answers(model, tokenizer, question, context, max_seq_len=40, doc_stride=12,
                                   align_to_words=False, logits=raw))


def test_equal_logits_give_the_first_token_at_the_uniform_probability(answerer: QuestionAnswerer,
                                                                      torch_qa: tuple[Any, Any]) -> None:
    question, context = "What?", "Every token here is as likely as any other."
    # top_k 1: the pipeline's argmax takes the first of equal spans (for more, its argpartition orders ties at will).
    options = answerer.options()
    windows, raw = _windows(answerer, question, context,
                            lambda e: (np.full(len(e.ids), 0.5, np.float32), np.full(len(e.ids), 0.5, np.float32)),
                            options)
    found = pick_answers(context, windows, cls_id=answerer.cls_id, options=options)
    tokens = sum(1 for sequence in windows[0].encoding.sequence_ids if sequence == 1)
    # The softmax runs over the context tokens and [CLS]; the first span (by start, then end) wins the tie.
    assert found[0]["score"] == pytest.approx(1 / (tokens + 1) ** 2, rel=1e-5)
    assert found[0]["start"] == 0 and found[0]["answer"] == "Every"
    _same(found, reference_answers(torch_qa[0], torch_qa[1], question, context, logits=raw))


def test_null_answer_wins_when_cls_is_likeliest(answerer: QuestionAnswerer, torch_qa: tuple[Any, Any]) -> None:
    question, context = "Is there an answer?", "Nothing in this context answers it."
    options = answerer.options(handle_impossible_answer=True)

    def logits(encoding: Any) -> tuple[np.ndarray, np.ndarray]:
        values = np.zeros(len(encoding.ids), np.float32)
        values[0] = 6.0
        return values, values.copy()

    windows, raw = _windows(answerer, question, context, logits, options)
    found = pick_answers(context, windows, cls_id=answerer.cls_id, options=options)
    assert found[0]["answer"] == "" and (found[0]["start"], found[0]["end"]) == (0, 0) and found[0]["score"] > 0.9
    _same(found, reference_answers(torch_qa[0], torch_qa[1], question, context, handle_impossible_answer=True,
                                   logits=raw))


def test_empty_and_blank_contexts(answerer: QuestionAnswerer, torch_qa: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError, match="context 0 is empty"):
        answerer.answer("Where?", "")
    with pytest.raises(ValueError, match="question 1 is empty"):
        answerer.answer(["Where?", ""], "Somewhere.")
    # A context of spaces has no token to answer with: the pipeline gives the empty span at score 0.
    blank = answerer.answer("Where?", "   ")
    assert blank == {"score": 0.0, "start": 0, "end": 0, "answer": ""}
    _same(blank, reference_answers(torch_qa[0], torch_qa[1], "Where?", "   "))


def test_a_question_longer_than_the_window_is_refused(answerer: QuestionAnswerer, corpus: list[str]) -> None:
    question = " ".join(corpus[:30])
    with pytest.raises(ValueError, match=r"the question is \d+ tokens long: a window of 384 tokens then holds -?\d+ "
                                         r"context tokens.*Shorten the question"):
        answerer.answer(question, corpus[0])


def test_bad_options_and_inputs_are_refused(answerer: QuestionAnswerer) -> None:
    with pytest.raises(ValueError, match="top_k"):
        answerer.answer("Where?", "Here.", top_k=0)
    with pytest.raises(ValueError, match=r"doc_stride \(64\) must be less than max_seq_len \(64\)"):
        answerer.answer("Where?", "Here.", max_seq_len=64, doc_stride=64)
    with pytest.raises(ValueError, match="over the model's maximum"):
        answerer.answer("Where?", "Here.", max_seq_len=4096)
    with pytest.raises(ValueError, match="2 questions and 1 contexts"):
        answerer.answer(["Where?", "When?"], ["Here."])
    with pytest.raises(TypeError, match="question must be a str or a list of str"):
        answerer.answer(3, "Here.")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one question with several contexts is ambiguous"):
        answerer.answer("Where?", ["Here.", "There."])
    with pytest.raises(ValueError, match="lone surrogate"):
        answerer.answer("Where?", "Here \ud800.")


def test_other_tasks_are_not_question_answering(qa: tuple[Path, Path], nli: tuple[Path, Path]) -> None:
    from deberta_onnx.runtime import SequenceClassifier
    from deberta_onnx.runtime.errors import TaskMismatchError

    with pytest.raises(TaskMismatchError, match="load it with QuestionAnswerer"):
        SequenceClassifier(qa[1])
    with pytest.raises(TaskMismatchError, match="question-answering"):
        QuestionAnswerer(nli[1])


def _outlier_qa_checkpoint(corpus: list[str], out: Path) -> Path:
    """The outlier checkpoint of tests/test_outliers.py under a question-answering head."""
    from deberta_onnx.export.testing import OutlierSpec, add_question_answering_head, build_random_checkpoint

    from .conftest import TINY_CONFIGS

    base = build_random_checkpoint(TINY_CONFIGS["v3-shared"], out / "base", texts=corpus, seed=1,
                                   outliers=OutlierSpec())
    return add_question_answering_head(base, out / "qa", seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
def test_lower_precisions_pass_the_gate_on_start_and_end_logits(qa: tuple[Path, Path], corpus: list[str],
                                                                tmp_path: Path, outliers: bool) -> None:
    """fp16 and both int8 variants, judged on the start and end logits of question-answering inputs; the runtime's
    answers from int8 keep the fp32 answer's span on most held-out pairs."""
    from deberta_onnx.export import ExportConfig, export_model

    src = _outlier_qa_checkpoint(corpus, tmp_path) if outliers else qa[0]
    out = tmp_path / "model"
    export_model(src, out, ExportConfig(quiet=True, precisions=("fp32", "fp16", "int8-dynamic", "int8-static"),
                                        validation_shapes=((1, 1), (2, 7), (5, 40))))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for name in ("fp16", "int8-dynamic", "int8-static"):
        quality = manifest["variants"][name]["quality"]
        assert quality["passed"] and quality["sentences"] == 100 and quality["finite"], name
    pairs = _contexts(corpus)[:2] + [(corpus[i], corpus[i + 1] + " " + corpus[i + 2]) for i in range(0, 60, 4)]
    fp32 = QuestionAnswerer(out, config=EncoderConfig(precision="fp32")).answer(*map(list, zip(*pairs)))
    int8 = QuestionAnswerer(out, config=EncoderConfig(precision="int8-static")).answer(*map(list, zip(*pairs)))
    same = sum((a["start"], a["end"]) == (b["start"], b["end"]) for a, b in zip(fp32, int8))  # type: ignore[index]
    assert same >= 0.8 * len(pairs), f"int8-static keeps the fp32 span on {same} of {len(pairs)} pairs"


def test_qa_command_answers_from_flags_and_jsonl(qa: tuple[Path, Path], answerer: QuestionAnswerer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], corpus: list[str]) -> None:
    from deberta_onnx.runtime.cli import main

    assert main(["qa", str(qa[1]), "--question", "What is it?", "--context", corpus[3]]) == 0
    assert json.loads(capsys.readouterr().out) == answerer.answer("What is it?", corpus[3])
    lines = tmp_path / "in.jsonl"
    pairs = [("Who?", corpus[5]), ("Where is the answer in the long one?", " ".join(corpus[40:90]))]
    lines.write_text("".join(json.dumps({"question": q, "context": c}) + "\n" for q, c in pairs), encoding="utf-8")
    assert main(["qa", str(qa[1]), "--input", str(lines), "--top-k", "2", "--output", str(tmp_path / "out")]) == 0
    written = [json.loads(line) for line in (tmp_path / "out").read_text(encoding="utf-8").splitlines()]
    assert written == answerer.answer([q for q, _ in pairs], [c for _, c in pairs], top_k=2)
    lines.write_text('{"question": "Who?"}\n', encoding="utf-8")
    assert main(["qa", str(qa[1]), "--input", str(lines)]) == 1
    assert '"question" and "context" strings' in capsys.readouterr().err
    assert main(["qa", str(qa[1]), "--question", "Who?"]) == 1
    assert "give --question and --context" in capsys.readouterr().err
    assert main(["info", str(qa[1])]) == 0
    assert "task:       question-answering (QuestionAnswerer)" in capsys.readouterr().out


@pytest.mark.slow
def test_deberta_v1_question_answering_exports_and_answers(tiny_checkpoint: Path, tmp_path: Path,
                                                          corpus: list[str]) -> None:
    """DeBERTa v1's head (``DebertaForQuestionAnswering``) exports and answers as v2's does."""
    import shutil

    import torch
    from transformers import AutoTokenizer, DebertaConfig, DebertaForQuestionAnswering

    from deberta_onnx.export import ExportConfig, export_model

    from .conftest import TOKENIZER_FILES

    src = tmp_path / "v1"
    config = DebertaConfig(vocab_size=4000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, relative_attention=True, max_relative_positions=64,
                           pos_att_type=["c2p", "p2c"], position_biased_input=False, type_vocab_size=0)
    torch.manual_seed(0)
    model = DebertaForQuestionAnswering(config).eval()
    with torch.no_grad():
        model.qa_outputs.weight.normal_(0.0, 0.3)
    model.save_pretrained(src)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, src / name)
    result = export_model(src, tmp_path / "out", ExportConfig(quiet=True, tokenizer="transformers",
                                                             validation_shapes=((1, 1), (2, 7), (5, 40))))
    assert result.manifest["source"]["architecture"] == "DebertaForQuestionAnswering"
    assert result.manifest["model"]["task"] == TASK_QUESTION_ANSWERING
    answerer, tokenizer = QuestionAnswerer(tmp_path / "out"), AutoTokenizer.from_pretrained(src)
    for question, context in _contexts(corpus):
        _same(answerer.answer(question, context, top_k=2),
              reference_answers(model, tokenizer, question, context, top_k=2))
