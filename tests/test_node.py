"""Exported folders in the JavaScript runtimes, from Node: onnxruntime-node, onnxruntime-web (its wasm backend, the
browser's CPU path) and transformers.js (``@huggingface/transformers``) loading the folder as it is, through its
Hugging Face layout (``config.json``, ``tokenizer_config.json``, ``onnx/model*.onnx``).

Needs ``node`` and the packages of ``tests/node`` (``ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci --prefix tests/node``,
which ``.ci/run`` does); skips without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig, QuestionAnswerer, SequenceClassifier
from deberta_onnx.runtime.contract import HUB_FILES, HUB_ONNX_DIR, PRECISIONS

from .conftest import HARD_TEXTS

NODE_DIR = Path(__file__).parent / "node"
PACKAGES = ("onnxruntime-node", "onnxruntime-web", "@huggingface/transformers")
# transformers.js's dtype for each variant's file name in onnx/.
DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8-dynamic": "q8", "int8-static": "int8"}
# transformers.js's tokenizer has no byte fallback (a Unigram vocabulary's <0xE6>-style byte pieces): where the
# tiny SentencePiece vocabulary falls back to bytes (CJK, some symbols) it gives [UNK] instead. These texts need none.
TEXTS = ["Hello world.", "A somewhat longer sentence, with punctuation; and numbers 12345.",
         *(HARD_TEXTS[i] for i in (1, 3, 5, 10, 11))]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (Node.js 18 or newer runs these tests)")
    missing = [name for name in PACKAGES if not (NODE_DIR / "node_modules" / name / "package.json").is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run `ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci --prefix "
                    "tests/node`")
    return node


def run_node(request: dict[str, Any]) -> dict[str, Any]:
    """Runs ``tests/node/run_folder.mjs`` on ``request``; returns its JSON answer."""
    done = subprocess.run([_node(), str(NODE_DIR / "run_folder.mjs")], input=json.dumps(request), text=True,
                          capture_output=True, timeout=600, env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(done.stdout))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _variants(folder: Path) -> dict[str, str]:
    return {name: entry["file"] for name, entry in
            json.loads((folder / "manifest.json").read_text())["variants"].items()}


@pytest.fixture(scope="module")
def hub_model(every_variant_model: Path) -> Path:
    """Every precision of the tiny checkpoint, default graph, with the token vectors transformers.js reads."""
    _node()
    return every_variant_model


@pytest.fixture(params=["default", "portable"])
def folder(request: pytest.FixtureRequest, hub_model: Path) -> Path:
    return hub_model if request.param == "default" else Path(request.getfixturevalue("portable_model"))


@pytest.mark.slow
def test_onnxruntime_node_and_web_give_python_s_vectors(folder: Path) -> None:
    files = _variants(folder)
    tokenizer = Encoder(folder, config=EncoderConfig(precision="fp32")).loaded.tokenizer
    ids, mask = tokenizer.pad(tokenizer.encode(TEXTS))
    answer = run_node({"folder": str(folder), "files": files, "input_ids": ids.tolist(),
                       "attention_mask": mask.tolist(), "output": "sentence_embedding"})
    for precision, file in files.items():
        session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
        expected = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        for runtime in ("node", "web"):
            got = answer[runtime][precision]
            assert not isinstance(got, dict), (runtime, precision, got)
            got = np.asarray(got, np.float32)
            assert got.shape == expected.shape, (runtime, precision)
            if runtime == "node" or precision == "fp32":  # the same kernels, or fp32 in wasm's
                np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4, err_msg=f"{runtime} {precision}")
            else:  # wasm's fp16 and integer kernels round otherwise; far inside the quality gate
                assert _cosine(got, expected).min() >= 0.999, (runtime, precision, _cosine(got, expected).min())


def test_the_hub_layout_names_the_variants_without_copies(hub_model: Path) -> None:
    manifest = json.loads((hub_model / "manifest.json").read_text())
    hub = manifest["hub"]
    assert hub["hard_links"] is True
    for precision, entry in manifest["variants"].items():
        name = f"{HUB_ONNX_DIR}/{HUB_FILES[precision]}"
        assert hub["files"][name] == entry["file"]
        assert os.path.samefile(hub_model / name, hub_model / entry["file"])  # one file on disk, two names
        assert manifest["files"][name] == manifest["files"][entry["file"]]
    settings = json.loads((hub_model / "tokenizer_config.json").read_text())
    special = json.loads((hub_model / "special_tokens_map.json").read_text())
    assert settings["pad_token"] == special["pad_token"] == hub["pad_token"] == "[PAD]"
    assert settings["model_max_length"] == manifest["model"]["max_sequence_length"]
    config = json.loads((hub_model / "config.json").read_text())
    assert config["model_type"] == "deberta-v2" and config["hidden_size"] == manifest["model"]["hidden_size"]


def test_transformers_js_feature_extraction_equals_encode(hub_model: Path) -> None:
    pipelines = [{"task": "feature-extraction", "dtype": DTYPES[p], "options": {"pooling": "mean"}} for p in PRECISIONS]
    answer = run_node({"folder": str(hub_model), "files": {}, "input_ids": [[1]], "attention_mask": [[1]],
                       "output": "sentence_embedding", "texts": TEXTS, "pipelines": pipelines})
    for precision, got in zip(PRECISIONS, answer["pipelines"]):
        assert not isinstance(got, dict), (precision, got)
        expected = Encoder(hub_model, config=EncoderConfig(precision=precision)).encode(TEXTS)
        cosine = _cosine(np.asarray(got), expected)
        # fp32: the same graph and tokenizer; the others: the same graph, pooled in JavaScript from token vectors.
        assert cosine.min() >= (0.9999 if precision == "fp32" else 0.999), (precision, cosine.min())
        if precision == "fp32":
            np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-4)


def test_transformers_js_text_classification_equals_the_classifier(nli: tuple[Path, Path]) -> None:
    _, folder = nli
    texts = TEXTS[:3]
    pipelines = [{"task": "text-classification", "dtype": "fp32", "options": {"top_k": None}}]
    answer = run_node({"folder": str(folder), "files": {}, "input_ids": [[1]], "attention_mask": [[1]],
                       "output": "logits", "texts": texts, "pipelines": pipelines})
    (got,) = answer["pipelines"]
    assert not isinstance(got, dict), got
    classifier = SequenceClassifier(folder)
    expected = classifier.probabilities(texts)
    labels = list(classifier.labels)
    for row, scores in zip(got, expected):
        by_label = {item["label"]: item["score"] for item in row}
        np.testing.assert_allclose([by_label[label] for label in labels], scores, atol=1e-5)


def test_transformers_js_question_answering_equals_the_answerer(qa: tuple[Path, Path]) -> None:
    """The question-answering folder as transformers.js' pipeline loads it (``onnx/model.onnx``, start and end
    logits): the same best span and score as ``QuestionAnswerer`` on short contexts. transformers.js has no
    ``max_answer_len`` and decodes the answer from its tokens, so ours is asked for spans of any length, not widened
    to whole words, and the answers are compared with their whitespace normalised."""
    _, folder = qa
    questions = ["Where do the trains leave from?", "When does the museum open?", "What is it?"]
    contexts = ["Trains leave from platform four.", "The museum opens at nine and closes at five.", TEXTS[1]]
    pipelines = [{"task": "question-answering", "dtype": "fp32", "args": [questions, contexts]}]
    answer = run_node({"folder": str(folder), "files": {}, "input_ids": [[1]], "attention_mask": [[1]],
                       "output": "start_logits", "pipelines": pipelines})
    (got,) = answer["pipelines"]
    assert not isinstance(got, dict), got
    expected = QuestionAnswerer(folder).answer(questions, contexts, max_answer_len=512, align_to_words=False)
    for ours, theirs in zip(expected, got):
        assert " ".join(theirs["answer"].split()) == " ".join(ours["answer"].split())  # type: ignore[index]
        assert theirs["score"] == pytest.approx(ours["score"], abs=1e-5)  # type: ignore[index]


@pytest.mark.slow
def test_transformers_js_finds_no_fill_mask_graph_to_misfeed(fill_mask: tuple[Path, Path]) -> None:
    """A fill-mask folder has no ``onnx/`` (its graph takes ``mask_positions``, which transformers.js would not
    feed): its fill-mask pipeline fails to find a model file instead of running the graph wrongly."""
    _, folder = fill_mask
    pipelines = [{"task": "fill-mask", "dtype": "fp32"}]
    answer = run_node({"folder": str(folder), "files": {}, "input_ids": [[1]], "attention_mask": [[1]],
                       "output": "logits", "texts": ["Paris is the [MASK] of France."], "pipelines": pipelines})
    (got,) = answer["pipelines"]
    assert isinstance(got, dict) and "onnx/model.onnx" in got["error"], got
