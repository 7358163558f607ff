"""Sequence and token classifiers: export of the heads, parity of logits with PyTorch (texts and pairs, with
and without token_type_ids), cross-encoder scores against sentence-transformers, and span aggregation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deberta_onnx.runtime import CrossEncoder, Encoder, SequenceClassifier, TokenClassifier
from deberta_onnx.runtime.classifier import Prediction
from deberta_onnx.runtime.errors import TaskMismatchError
from deberta_onnx.runtime.postprocess import Span, aggregate_spans, softmax

from .conftest import NER_LABELS, NLI_LABELS

PAIRS = [
    ("A man is playing a guitar.", "Someone makes music."),
    ("The cat sleeps on the sofa.", "A dog runs in the park."),
    ("Is it raining?", "The streets are wet and people carry umbrellas."),
    ("short", "a considerably longer second text that goes on for a while " * 3),
]
TEXTS = ["Ada Lovelace lived in London.", "Marie Curie worked in Paris and Warsaw.", "nothing here", "x"]


def _torch_logits(src: Path, inputs: list) -> tuple[torch.Tensor, dict]:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    config = json.loads((src / "config.json").read_text())
    loader = (AutoModelForTokenClassification if config["architectures"][0].endswith("TokenClassification")
              else AutoModelForSequenceClassification)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if isinstance(inputs[0], tuple):
        batch = tokenizer([a for a, _ in inputs], [b for _, b in inputs], padding=True, truncation=True,
                          return_tensors="pt")
    else:
        batch = tokenizer(inputs, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return loader.from_pretrained(src).eval()(**batch).logits, batch


def test_sequence_classifier_matches_pytorch_on_texts_and_pairs(nli: tuple[Path, Path]) -> None:
    src, folder = nli
    classifier = SequenceClassifier(folder)
    assert classifier.labels == tuple(NLI_LABELS)
    for inputs in (PAIRS, TEXTS):
        expected, _ = _torch_logits(src, inputs)
        for batch_size in (1, 3):
            np.testing.assert_allclose(classifier.logits(inputs, batch_size=batch_size), expected.numpy(),
                                       atol=1e-4, rtol=0)
    predictions = classifier.predict(PAIRS)
    expected_probs = torch.softmax(_torch_logits(src, PAIRS)[0], dim=-1).numpy()
    assert [p.label for p in predictions] == [NLI_LABELS[i] for i in expected_probs.argmax(1)]
    np.testing.assert_allclose([p.score for p in predictions], expected_probs.max(1), atol=1e-5)
    np.testing.assert_allclose(classifier.probabilities(PAIRS).sum(axis=1), 1.0, rtol=1e-5)
    single = classifier.predict(PAIRS[0])  # a tuple is one pair
    assert isinstance(single, Prediction) and single == predictions[0]
    assert len(classifier.predict(list(PAIRS[0]))) == 2  # a list of two str is two texts


@pytest.mark.slow
def test_graph_declares_token_type_ids_only_when_the_model_uses_them(nli: tuple[Path, Path],
                                                                      reranker: tuple[Path, Path]) -> None:
    for (_, folder), wanted in ((nli, ["input_ids", "attention_mask"]),
                                (reranker, ["input_ids", "attention_mask", "token_type_ids"])):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert [i["name"] for i in manifest["graph"]["inputs"]] == wanted
        assert [i.name for i in onnx.load(str(folder / "model.onnx")).graph.input] == wanted
        (output,) = manifest["graph"]["outputs"]
        assert output["name"] == "logits" and output["dims"][0] == "batch"
        assert manifest["model"]["task"] == "sequence-classification" and manifest["model"]["pooling"] is None
        assert manifest["variants"]["fp32"]["validation"]["passed"] is True
    assert json.loads((reranker[1] / "manifest.json").read_text())["model"]["labels"] == ["LABEL_0"]


def test_token_types_reach_the_graph(reranker: tuple[Path, Path]) -> None:
    """Raw scores equal PyTorch's with the pair's segment ids, and those ids matter: zeroing them moves the
    PyTorch scores far beyond the tolerance."""
    from transformers import AutoModelForSequenceClassification

    src, folder = reranker
    expected, batch = _torch_logits(src, PAIRS)
    assert int(batch["token_type_ids"].max()) == 1
    np.testing.assert_allclose(CrossEncoder(folder).predict(PAIRS, activation=False), expected.numpy()[:, 0],
                               atol=1e-4, rtol=0)
    with torch.no_grad():
        zeroed = AutoModelForSequenceClassification.from_pretrained(src).eval()(
            **{**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])}).logits
    assert float((zeroed - expected).abs().max()) > 1e-3  # ten times the parity tolerance


def test_cross_encoder_equals_sentence_transformers(reranker: tuple[Path, Path]) -> None:
    from sentence_transformers import CrossEncoder as StCrossEncoder

    src, folder = reranker
    theirs = StCrossEncoder(str(src), device="cpu").predict(PAIRS, batch_size=2)
    ours = CrossEncoder(folder).predict(PAIRS, batch_size=2)
    assert ours.shape == (len(PAIRS),)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert isinstance(CrossEncoder(folder).predict(PAIRS[1]), float)


def test_rank_orders_documents(reranker: tuple[Path, Path]) -> None:
    _, folder = reranker
    encoder = CrossEncoder(folder)
    documents = [b for _, b in PAIRS] + [PAIRS[0][1]]  # the last is a duplicate of the first: a tie
    scores = encoder.predict([(PAIRS[0][0], d) for d in documents])
    hits = encoder.rank(PAIRS[0][0], documents)
    assert [h.index for h in hits] == sorted(range(len(documents)), key=lambda i: (-scores[i], i))
    assert [h.index for h in encoder.rank(PAIRS[0][0], documents, top_k=2)] == [h.index for h in hits[:2]]
    with pytest.raises(TypeError, match=r"inputs\[0\] is str; each item must be a \(text, text_pair\) pair"):
        encoder.predict(["not a pair"])


def test_rank_needs_one_label(nli: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="one-label cross-encoder"):
        CrossEncoder(nli[1]).rank("q", ["d"])


def test_token_classifier_matches_pytorch(ner: tuple[Path, Path]) -> None:
    src, folder = ner
    expected, batch = _torch_logits(src, TEXTS)
    classifier = TokenClassifier(folder)
    logits = classifier.logits(TEXTS, batch_size=2)
    for i, row in enumerate(logits):
        length = int(batch["attention_mask"][i].sum())
        assert row.shape == (length, len(NER_LABELS))
        np.testing.assert_allclose(row, expected[i, :length].numpy(), atol=1e-4, rtol=0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["task"] == "token-classification" and manifest["model"]["labels"] == NER_LABELS
    assert manifest["graph"]["outputs"][0]["dims"] == ["batch", "sequence", len(NER_LABELS)]


def test_token_spans_follow_the_pytorch_labels(ner: tuple[Path, Path]) -> None:
    """Per token ("none"), each span carries the argmax label of PyTorch's logits for that token, and its text
    is the token's piece of the input."""
    from transformers import AutoTokenizer

    src, folder = ner
    expected, _ = _torch_logits(src, TEXTS)
    reference = AutoTokenizer.from_pretrained(src)(TEXTS, return_offsets_mapping=True)
    classifier = TokenClassifier(folder)
    per_token = classifier.predict(TEXTS, aggregation="none")
    for i, spans in enumerate(per_token):
        offsets, words = reference["offset_mapping"][i], reference.word_ids(i)
        # Tokens with characters of their own (not [CLS]/[SEP], not a lone word-start marker sharing the next
        # token's span), each with PyTorch's argmax label.
        own = [j for j, word in enumerate(words) if word is not None and offsets[j][1] > offsets[j][0]
               and not (j + 1 < len(words) and words[j + 1] == word and offsets[j + 1] == offsets[j])]
        wanted = [NER_LABELS[int(expected[i, j].argmax())] for j in own]
        assert [s.label for s in spans] == [label for label in wanted if label != "O"]
        for span in spans:
            assert span.text == TEXTS[i][span.start : span.end] and span.text == span.text.strip()
    for aggregation in ("simple", "first", "average", "max"):
        for text, spans in zip(TEXTS, classifier.predict(TEXTS, aggregation=aggregation)):
            assert all(s.label in {"PER", "LOC"} and 0 < s.score <= 1 for s in spans)
            assert all(a.end <= b.start for a, b in itertools.pairwise(spans))  # in order, not overlapping
            assert all(s.text == text[s.start : s.end] for s in spans)
    assert classifier.predict("Ada Lovelace.") == classifier.predict(["Ada Lovelace."])[0]


def _probs(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def test_aggregate_spans_by_hand() -> None:
    labels = NER_LABELS  # O, B-PER, I-PER, B-LOC, I-LOC
    text = "Ada Love in Rome"
    # [CLS] ▁Ada ▁Lo ve ▁in ▁Ro me [SEP]; words: Ada, Love, in, Rome
    offsets = [(0, 0), (0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16), (0, 0)]
    word_ids = [None, 0, 1, 1, 2, 3, 3, None]
    probs = _probs([
        [1, 0, 0, 0, 0],
        [0.1, 0.8, 0.1, 0, 0],        # Ada: B-PER
        [0.1, 0.1, 0.6, 0.2, 0],      # Lo: I-PER
        [0.1, 0, 0.2, 0.7, 0],        # ve: B-LOC (a word split between labels)
        [0.9, 0.1, 0, 0, 0],          # in: O
        [0.2, 0, 0, 0, 0.8],          # Ro: I-LOC (no B- before it: starts an entity)
        [0.3, 0, 0, 0, 0.7],          # me: I-LOC
        [1, 0, 0, 0, 0],
    ])

    def spans(aggregation: str) -> list[tuple[str, str]]:
        return [(s.label, s.text) for s in aggregate_spans(text, offsets, word_ids, probs, labels,
                                                           aggregation=aggregation)]

    assert spans("none") == [("B-PER", "Ada"), ("I-PER", "Lo"), ("B-LOC", "ve"), ("I-LOC", "Ro"), ("I-LOC", "me")]
    assert spans("simple") == [("PER", "Ada Lo"), ("LOC", "ve"), ("LOC", "Rome")]
    assert spans("first") == [("PER", "Ada Love"), ("LOC", "Rome")]  # Love takes Lo's I-PER
    assert spans("max") == [("PER", "Ada"), ("LOC", "Love"), ("LOC", "Rome")]  # ve (0.7) beats Lo (0.6)
    # average over Lo and ve: [0.1, 0.05, 0.4, 0.45, 0] -> B-LOC
    assert spans("average") == [("PER", "Ada"), ("LOC", "Love"), ("LOC", "Rome")]
    first = aggregate_spans(text, offsets, word_ids, probs, labels, aggregation="first")
    assert first[0] == Span("PER", pytest.approx((0.8 + 0.6) / 2), 0, 8, "Ada Love")
    assert first[1].score == pytest.approx((0.8 + 0.8) / 2)
    assert aggregate_spans(text, offsets, word_ids, probs, labels, ignore_labels=("O", "B-PER", "I-PER"),
                           aggregation="first") == [first[1]]
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_spans(text, offsets, word_ids, probs, labels, aggregation="longest")


def test_word_start_marker_gives_no_span_of_its_own() -> None:
    # "x" tokenized as [CLS] ▁ x [SEP]: the lone marker borrows x's span (0, 1).
    offsets, word_ids = [(0, 0), (0, 1), (0, 1), (0, 0)], [None, 0, 0, None]
    probs = _probs([[1, 0, 0, 0, 0], [0, 0.9, 0, 0.1, 0], [0, 0.2, 0, 0.8, 0], [1, 0, 0, 0, 0]])
    by_token = aggregate_spans("x", offsets, word_ids, probs, NER_LABELS, aggregation="none")
    assert [(s.label, s.start, s.end) for s in by_token] == [("B-LOC", 0, 1)]
    by_word = aggregate_spans("x", offsets, word_ids, probs, NER_LABELS, aggregation="first")
    assert [(s.label, s.text) for s in by_word] == [("PER", "x")]  # the word's first token is the marker


def test_softmax_is_stable() -> None:
    out = softmax(np.array([[1000.0, 1000.0], [-1000.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.0, 1.0]], atol=1e-12)


def test_wrong_class_for_the_folder_names_the_right_one(nli: tuple[Path, Path], ner: tuple[Path, Path],
                                                        tiny_model: Path) -> None:
    with pytest.raises(TaskMismatchError,
                       match="task 'sequence-classification'.*SequenceClassifier, CrossEncoder or ZeroShotClassifier"):
        Encoder(nli[1])
    with pytest.raises(TaskMismatchError, match="task 'embedding', which TokenClassifier cannot run.*with Encoder"):
        TokenClassifier(tiny_model)
    with pytest.raises(TaskMismatchError, match="task 'token-classification'.*TokenClassifier"):
        SequenceClassifier(ner[1])


def test_export_refuses_a_head_the_checkpoint_lacks(tiny_checkpoint: Path, nli: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    from deberta_onnx.export import ExportConfig, ExportError, UnsupportedModelError, export_model

    with pytest.raises(UnsupportedModelError, match="has no token-classification head.*random head"):
        export_model(tiny_checkpoint, tmp_path / "out", ExportConfig(quiet=True, task="token-classification"))
    with pytest.raises(ExportError, match="--pooling, --token-embeddings apply to embedding graphs"):
        export_model(nli[0], tmp_path / "out", ExportConfig(quiet=True, pooling="cls", token_embeddings=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_task_embedding_exports_the_encoder_of_a_classifier(nli: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModel

    from deberta_onnx.export import ExportConfig, export_model

    src, _ = nli
    export_model(src, tmp_path / "enc", ExportConfig(quiet=True, task="embedding", tokenizer="transformers",
                                                     validation_shapes=((2, 9),)))
    _, batch = _torch_logits(src, TEXTS)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(src).eval()(input_ids=batch["input_ids"],
                                                       attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(Encoder(tmp_path / "enc").encode(TEXTS), expected, atol=1e-4, rtol=0)


def test_token_budget_batches_and_io_binding_setting(nli: tuple[Path, Path], ner: tuple[Path, Path]) -> None:
    """Classifiers batch as the Encoder does (a token budget gives the same logits) and run through
    session.run: asking them for IO binding is refused, leaving it unset is fine."""
    from deberta_onnx.runtime import EncoderConfig

    inputs = PAIRS + TEXTS
    budget = SequenceClassifier(nli[1], config=EncoderConfig(max_tokens=40, sequence_bucket=8))
    np.testing.assert_allclose(budget.logits(inputs), SequenceClassifier(nli[1]).logits(inputs), atol=1e-5, rtol=0)
    for a, b in zip(TokenClassifier(ner[1], config=EncoderConfig(max_tokens=40)).logits(TEXTS),
                    TokenClassifier(ner[1]).logits(TEXTS)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="io_binding runs embedding graphs"):
        CrossEncoder(nli[1], config=EncoderConfig(io_binding=True))
    with pytest.raises(ValueError, match="cuda_graph runs embedding graphs"):
        TokenClassifier(ner[1], config=EncoderConfig(cuda_graph=True, device="cuda"))
