"""The optional token_embeddings output and Encoder.encode_tokens, against PyTorch's last hidden state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.encoder import TokenEmbeddings
from deberta_onnx.runtime.errors import NotExportedError

from .conftest import HARD_TEXTS
from .reference import reference_embeddings, reference_hidden


@pytest.fixture(scope="module")
def token_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("tokens") / "model"
    export_model(tiny_checkpoint, out, ExportConfig(quiet=True, token_embeddings=True))
    return out


@pytest.mark.slow
def test_manifest_declares_the_second_output(token_model: Path) -> None:
    manifest = json.loads((token_model / "manifest.json").read_text())
    outputs = {o["name"]: o for o in manifest["graph"]["outputs"]}
    assert outputs["token_embeddings"]["dims"] == ["batch", "sequence", 32]
    assert outputs["sentence_embedding"]["dims"] == ["batch", 32]
    report = manifest["variants"]["fp32"]["validation"]
    assert report["passed"] and {row["worst_output"] for row in report["shapes"]} <= set(outputs)


def test_encode_tokens_matches_pytorch(token_model: Path, tiny_checkpoint: Path, corpus: list[str]) -> None:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "spm.model"))
    texts = HARD_TEXTS[:5] + corpus[:12]
    hidden, mask = reference_hidden(tiny_checkpoint, texts)
    results = Encoder(token_model).encode_tokens(texts, batch_size=4)
    assert len(results) == len(texts)
    for i, (text, result) in enumerate(zip(texts, results)):
        length = int(mask[i].sum())
        assert result.vectors.shape == (length, 32) and result.vectors.dtype == np.float32
        np.testing.assert_allclose(result.vectors, hidden[i, :length].numpy(), atol=1e-4, rtol=0)
        assert result.tokens == ["[CLS]", *processor.encode(text, out_type=str), "[SEP]"]
        assert len(result.offsets) == length and result.offsets[0] == (0, 0)
        starts = [start for start, _ in result.offsets[1:-1]]
        assert starts == sorted(starts) and all(0 <= s <= e <= len(text) for s, e in result.offsets)
        if text.isascii() and text == " ".join(text.split()):  # NFKC changes nothing: spans spell the tokens
            for (start, end), token in zip(result.offsets[1:-1], result.tokens[1:-1]):
                if token != "\u2581":  # a lone word-start marker borrows the next character's span
                    assert text[start:end].strip() == token.lstrip("\u2581"), (text, token)


def test_sentence_output_unchanged_and_equals_mean_of_tokens(token_model: Path, tiny_checkpoint: Path,
                                                             corpus: list[str]) -> None:
    texts = corpus[:10]
    encoder = Encoder(token_model)
    vectors = encoder.encode(texts)
    np.testing.assert_allclose(vectors, reference_embeddings(tiny_checkpoint, texts), atol=1e-4, rtol=0)
    means = np.stack([t.vectors.mean(axis=0) for t in encoder.encode_tokens(texts)])
    np.testing.assert_allclose(means, vectors, atol=1e-5, rtol=0)


def test_single_string_truncation_and_empty(token_model: Path) -> None:
    encoder = Encoder(token_model)
    one = encoder.encode_tokens("Just one text.")
    assert isinstance(one, TokenEmbeddings) and one.tokens[0] == "[CLS]" and one.tokens[-1] == "[SEP]"
    assert encoder.encode_tokens(["word " * 2000])[0].vectors.shape == (512, 32)
    with pytest.raises(ValueError, match="longer than the model's maximum"):
        encoder.encode_tokens(["word " * 2000], truncate=False)
    assert encoder.encode_tokens([]) == []


def test_folder_without_token_output_says_how_to_export(tiny_model: Path) -> None:
    with pytest.raises(NotExportedError, match="without token embeddings.*--token-embeddings"):
        Encoder(tiny_model).encode_tokens(["text"])


def test_io_binding_and_token_budget_leave_both_outputs_alone(token_model: Path, corpus: list[str]) -> None:
    """The IO-binding path binds only the sentence vectors; the second output neither disturbs it nor is lost
    to encode_tokens, and token-budget batching gives the same per-token vectors."""
    from deberta_onnx.runtime import EncoderConfig

    texts = [*corpus[:20], "word " * 300]
    plain = Encoder(token_model)
    bound = Encoder(token_model, config=EncoderConfig(io_binding=True, max_tokens=256))
    np.testing.assert_allclose(bound.encode(texts), plain.encode(texts), atol=1e-5, rtol=0)
    for a, b in zip(bound.encode_tokens(texts), plain.encode_tokens(texts)):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5, rtol=0)
