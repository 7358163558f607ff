"""Sequence and token classifiers' lower precisions under the quality gate: what the gate reads of their logits
(hand-built arrays), and, on the tiny NLI, reranker and NER fixtures and the same heads on the outlier encoder,
each precision either passes the gate and then keeps the fp32 answers within it through the library, the classify
command and the server, or is refused with ``QualityGateError`` and the figure it measured."""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from deberta_onnx.runtime import CrossEncoder, EncoderConfig, SequenceClassifier, TokenClassifier, ZeroShotClassifier
from deberta_onnx.runtime.loader import best_precision
from deberta_onnx.runtime.postprocess import row_cosine

from .conftest import NER_LABELS, NLI_LABELS, TINY_CONFIGS

PRECISIONS = ("fp16", "int8-dynamic", "int8-static")
THRESHOLDS = {"fp16": 0.999, "int8-dynamic": 0.99, "int8-static": 0.99}
# Each fixture: its task, labels, and the session fixture holding the same head on the tiny random encoder.
CASES = {"nli": ("sequence-classification", NLI_LABELS), "reranker": ("sequence-classification", ["LABEL_0"]),
         "ner": ("token-classification", NER_LABELS)}


# --- what the gate reads, on hand-built arrays -----------------------------------------------------------------------

def test_gate_reads_one_label_scores_per_query_and_token_logits_at_real_tokens() -> None:
    from deberta_onnx.export.precision import RANKED_DOCUMENTS, gate_items, gate_readout

    texts = ["a", "b", "c", "d", "e", "f"]
    pairs = gate_readout("sequence-classification", labels=3)
    assert gate_items(pairs, texts) == [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e"), ("e", "f"), ("f", "a")]
    assert gate_items(gate_readout("question-answering"), texts)[0] == ("a", "b c")
    one = gate_readout("sequence-classification", labels=1)
    items = gate_items(one, texts)
    assert len(items) == len(texts) * RANKED_DOCUMENTS
    assert items[:RANKED_DOCUMENTS] == [("a", text) for text in texts[1 : 1 + RANKED_DOCUMENTS]]

    # One score per pair, run 8 pairs a call: one row per query, its documents' scores less their mean.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(len(items), 1))

    def read(values: np.ndarray) -> np.ndarray:
        feeds = [(np.arange(i, min(i + 8, len(items)))[:, None], np.ones((min(8, len(items) - i), 1)))
                 for i in range(0, len(items), 8)]
        return one.read(lambda feed: [values[feed[0][:, 0]]], feeds, width=1)

    reference = read(scores)
    assert reference.shape == (len(texts), RANKED_DOCUMENTS)
    np.testing.assert_allclose(reference.sum(axis=1), 0.0, atol=1e-12)
    shifted = scores + np.repeat(rng.normal(size=len(texts)), RANKED_DOCUMENTS)[:, None]
    np.testing.assert_allclose(row_cosine(read(shifted), reference), 1.0)  # a shift per query orders alike
    swapped = scores.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    cosines = row_cosine(read(swapped), reference)
    assert cosines[0] < 0.99 and np.allclose(cosines[1:], 1.0)

    # Token logits: each real token's labels less their mean; padding and the batch's length do not count.
    tokens = gate_readout("token-classification")
    logits = rng.normal(size=(2, 5, 3))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    moved = logits + rng.normal(size=(2, 5, 1))
    moved[0, 3:] = 1e6
    batched = tokens.vectors([logits], mask, 7)
    assert batched.shape == (2, 7 * 3)
    np.testing.assert_allclose(tokens.vectors([moved], mask, 7), batched, atol=1e-9)
    np.testing.assert_allclose(tokens.vectors([logits[:1, :3]], mask[:1, :3], 7), batched[:1])


# --- exports of each fixture with every lower precision --------------------------------------------------------------

@dataclass(frozen=True)
class Gated:
    """One fixture exported with every precision the gate let through; ``refused``: the others' messages."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    refused: dict[str, str]

    @property
    def task(self) -> str:
        return CASES[self.name.split("-")[0]][0]

    @property
    def labels(self) -> list[str]:
        return CASES[self.name.split("-")[0]][1]


def _export_under_gate(src: Path, out: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Exports ``src`` with every lower precision; one the gate refuses is recorded with its message (nothing
    written) and the export runs again without it."""
    from deberta_onnx.export import ExportConfig, QualityGateError, export_model

    wanted, refused = list(PRECISIONS), {}
    while True:
        config = ExportConfig(quiet=True, tokenizer="transformers", precisions=("fp32", *wanted),
                              validation_shapes=((2, 7), (3, 33)))
        try:
            return export_model(src, out, config).manifest, refused
        except QualityGateError as exc:
            assert not out.exists(), "a refused export left its folder"
            refused[exc.precision] = str(exc)
            wanted.remove(exc.precision)


@pytest.fixture(scope="module")
def outlier_encoder(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    from deberta_onnx.export.testing import OutlierSpec, build_random_checkpoint

    return build_random_checkpoint(TINY_CONFIGS["v3-shared"], tmp_path_factory.mktemp("outliers"), texts=corpus,
                                   seed=1, outliers=OutlierSpec())


@pytest.fixture(scope="module")
def gated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Gated]:
    """``gated(name)``: the fixture ``name`` (``nli``, ``reranker``, ``ner``, or with ``-outliers`` the same head on
    the outlier encoder) exported under the gate, once a module."""
    made: dict[str, Gated] = {}

    def make(name: str) -> Gated:
        if name not in made:
            base, outliers = name.split("-")[0], name.endswith("-outliers")
            folder = tmp_path_factory.mktemp(name)
            if outliers:
                from deberta_onnx.export.testing import add_head

                task, labels = CASES[base]
                src = add_head(request.getfixturevalue("outlier_encoder"), folder / "ckpt", task=task,
                               labels=labels, seed=3)
            else:
                src = request.getfixturevalue(base)[0]
            manifest, refused = _export_under_gate(src, folder / "model")
            made[name] = Gated(name=name, folder=folder / "model", manifest=manifest, refused=refused)
        return made[name]

    return make


def _readout_rows(gated: Gated, precision: str, texts: list[str]) -> np.ndarray:
    """What the gate compares, computed through the runtime's classes on the gate's inputs made of ``texts``: one
    row per text."""
    from deberta_onnx.export.precision import gate_items, gate_readout

    config = EncoderConfig(precision=precision)
    readout = gate_readout(gated.task, labels=len(gated.labels))
    items = gate_items(readout, texts)
    if gated.task == "token-classification":
        logits = TokenClassifier(gated.folder, config=config).logits(texts)
        centred = [np.ravel(row - row.mean(axis=-1, keepdims=True)) for row in logits]
        width = max(len(row) for row in centred)
        return np.stack([np.pad(row, (0, width - len(row))) for row in centred])
    if len(gated.labels) == 1:
        scores = np.asarray(CrossEncoder(gated.folder, config=config).predict(items, activation=False))
        grouped = scores.reshape(len(texts), -1)
        return grouped - grouped.mean(axis=1, keepdims=True)
    logits = SequenceClassifier(gated.folder, config=config).logits(items)
    return logits - logits.mean(axis=1, keepdims=True)


def _check_gated(gated: Gated, corpus: list[str]) -> dict[str, float]:
    """Each precision: refused with its figure below the threshold in the message, or passed with its figure at or
    above it, and then the runtime's readout of it within the gate of the runtime's fp32 one on held-out texts.
    Returns the gate's min cosine per precision."""
    from deberta_onnx.export.precision import split_sentences

    figures = {}
    held_out = split_sentences(corpus)[1][:24]
    fp32 = _readout_rows(gated, "fp32", held_out)
    for precision in PRECISIONS:
        threshold = THRESHOLDS[precision]
        if precision in gated.refused:
            message = gated.refused[precision]
            assert message.startswith(f"{precision} failed the quality gate"), message
            measured = [float(m) for m in re.findall(rf"(\d\.\d{{8}})[^<]*< {threshold:.8f}", message)]
            assert measured and min(measured) < threshold, message
            assert precision not in gated.manifest["variants"]
            figures[precision] = min(measured)
            continue
        quality = gated.manifest["variants"][precision]["quality"]
        assert quality["passed"] and quality["finite"] and quality["threshold"] == threshold, quality
        assert quality["min_cosine"] >= threshold
        figures[precision] = quality["min_cosine"]
        cosines = row_cosine(_readout_rows(gated, precision, held_out), fp32)
        assert cosines.min() >= threshold, (precision, cosines.min())
    return figures


def test_nli_int8_passes_the_gate_and_runs_through_the_library(gated: Callable[[str], Gated],
                                                               corpus: list[str]) -> None:
    """The quick tier's export: the tiny NLI model's every precision under the gate, the runtime loading int8-static
    by default on the CPU, as an embedding folder's does."""
    nli = gated("nli")
    _check_gated(nli, corpus)
    held = sorted(nli.manifest["variants"])
    expected = best_precision(held, "CPUExecutionProvider", nli.manifest["default_variant"])[0]
    assert SequenceClassifier(nli.folder).precision == expected
    assert ZeroShotClassifier(nli.folder).precision == expected
    if "int8-static" in held:
        assert expected == "int8-static"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reranker", "ner", "nli-outliers", "reranker-outliers", "ner-outliers"])
def test_each_precision_passes_the_gate_or_is_refused_with_its_figure(gated: Callable[[str], Gated],
                                                                      corpus: list[str], name: str) -> None:
    case = gated(name)
    _check_gated(case, corpus)
    held = sorted(case.manifest["variants"])
    loader = TokenClassifier if case.task == "token-classification" else SequenceClassifier
    assert loader(case.folder).precision == best_precision(held, "CPUExecutionProvider")[0]


def _int8_folder(gated: Gated) -> tuple[Path, str]:
    """The folder and its int8 precision (static where the gate let it through)."""
    held = gated.manifest["variants"]
    precision = next((name for name in ("int8-static", "int8-dynamic") if name in held), None)
    if precision is None:
        pytest.fail(f"{gated.name}: the gate refused both int8 variants: {gated.refused}")
    return gated.folder, precision


@pytest.mark.slow
def test_zero_shot_through_int8_nli_keeps_the_fp32_top_labels(gated: Callable[[str], Gated]) -> None:
    from .test_zero_shot import LABELS, TEXTS

    folder, precision = _int8_folder(gated("nli"))
    fp32 = ZeroShotClassifier(folder, config=EncoderConfig(precision="fp32"))
    int8 = ZeroShotClassifier(folder, config=EncoderConfig(precision=precision))
    for multi_label in (False, True):
        expected = fp32.predict(TEXTS, LABELS, multi_label=multi_label)
        got = int8.predict(TEXTS, LABELS, multi_label=multi_label)
        assert [r.labels[0] for r in got] == [r.labels[0] for r in expected]
        # Within what the gate allows of the logits, the scores move by far less than they differ between labels.
        np.testing.assert_allclose([r.scores for r in got], [r.scores for r in expected], atol=2e-2)


@pytest.mark.slow
def test_classify_command_runs_the_int8_variants(gated: Callable[[str], Gated], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    folder, precision = _int8_folder(gated("nli"))
    pairs = [("A man plays a guitar.", "Someone makes music."), ("It rains.", "The sun is out.")]
    (tmp_path / "pairs.tsv").write_text("\n".join("\t".join(p) for p in pairs), encoding="utf-8")
    assert main(["classify", str(folder), "--input", str(tmp_path / "pairs.tsv"), "--pairs",
                 "--precision", precision]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    library = SequenceClassifier(folder, config=EncoderConfig(precision=precision))
    assert library.precision == precision
    assert [(r["label"], round(r["score"], 5)) for r in rows] == [(p.label, round(p.score, 5))
                                                                  for p in library.predict(pairs)]

    ner, ner_precision = _int8_folder(gated("ner"))
    texts = ["Ada Lovelace lived in London.", "nothing"]
    (tmp_path / "texts.txt").write_text("\n".join(texts), encoding="utf-8")
    assert main(["classify", str(ner), "--input", str(tmp_path / "texts.txt"), "--precision", ner_precision]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    spans = TokenClassifier(ner, config=EncoderConfig(precision=ner_precision)).predict(texts)
    assert [[(s["label"], s["start"], s["end"]) for s in r["spans"]] for r in rows] == [
        [(s.label, s.start, s.end) for s in row] for row in spans]


@pytest.mark.slow
def test_server_serves_the_int8_variants(gated: Callable[[str], Gated], tmp_path: Path) -> None:
    """A server of the gated folders loads each one's int8 variant on the CPU (``/health``) and answers as the
    library does at that precision."""
    from deberta_onnx.runtime.server.testing import ServerProcess

    precisions, folders = {}, {}
    for name in ("nli", "reranker", "ner"):
        folder, precisions[name] = _int8_folder(gated(name))
        folders[name] = Path(shutil.copytree(folder, tmp_path / name))
    nli_precision, ner_precision = precisions["nli"], precisions["ner"]
    texts = ["Ada Lovelace lived in London.", "The senate voted on the bill."]
    with ServerProcess(list(folders.values()), "--threads", "1") as server:
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert {m["model"]: m["precision"] for m in health["models"]} == precisions
        documents = ["The coastal line departs from platform four.", "Bananas are rich in potassium.", "Tickets."]
        body = httpx.post(f"{server.url}/v1/rerank", json={"model": "reranker", "query": "Where do trains leave?",
                                                          "documents": documents}, timeout=60).json()
        cross = CrossEncoder(folders["reranker"], config=EncoderConfig(precision=precisions["reranker"]))
        assert [(r["index"], pytest.approx(r["relevance_score"], abs=1e-5)) for r in body["results"]] == [
            (hit.index, hit.score) for hit in cross.rank("Where do trains leave?", documents)]
        body = httpx.post(f"{server.url}/v1/classify", json={"model": "nli", "input": texts}, timeout=60).json()
        expected = SequenceClassifier(folders["nli"], config=EncoderConfig(precision=nli_precision))
        np.testing.assert_allclose([[s["score"] for s in sorted(d["scores"], key=lambda s: NLI_LABELS.index(
            s["label"]))] for d in body["data"]], expected.probabilities(texts), atol=1e-5)
        body = httpx.post(f"{server.url}/v1/classify", json={"model": "ner", "input": texts}, timeout=60).json()
        spans = TokenClassifier(folders["ner"], config=EncoderConfig(precision=ner_precision)).predict(texts)
        assert [[(s["label"], s["start"], s["end"]) for s in d["spans"]] for d in body["data"]] == [
            [(s.label, s.start, s.end) for s in row] for row in spans]
        assert server.stop(signal.SIGTERM) == 0, server.log
