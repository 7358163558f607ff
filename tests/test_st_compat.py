"""sentence-transformers' call shape: ``Encoder.encode`` and ``CrossEncoder.predict`` / ``rank`` called with
sentence-transformers' keywords give what sentence-transformers gives on the same checkpoint, the quantizer
equals its ``quantize_embeddings``, and the keywords that need torch are refused with a clear error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import CrossEncoder, Encoder, Hit
from deberta_onnx.runtime.postprocess import EMBEDDING_PRECISIONS, quantize_embeddings

from .conftest import HARD_TEXTS
from .test_classifiers import PAIRS

TEXTS = [*HARD_TEXTS[:6], "a fairly long text " * 20, "the cat sat on the mat", "a dog in the park"]


@pytest.fixture(scope="module")
def reference(sbert: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(sbert[0]), device="cpu")


@pytest.fixture(scope="module")
def encoder(sbert: tuple[Path, Path]) -> Encoder:
    return Encoder(sbert[1])


@pytest.mark.parametrize("keywords", [
    {},
    {"batch_size": 4, "show_progress_bar": False, "convert_to_numpy": True, "convert_to_tensor": False},
    {"normalize_embeddings": True},
    {"truncate_dim": 16},
    {"truncate_dim": 16, "normalize_embeddings": True},
    {"prompt": "query: "},
    {"device": "cpu"},
], ids=lambda k: ",".join(k) or "defaults")
def test_encode_equals_sentence_transformers(reference, encoder: Encoder, keywords: dict) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.encode(TEXTS, **keywords)
    actual = encoder.encode(TEXTS, **keywords)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    one = encoder.encode(TEXTS[1], **keywords)  # a single str gives one vector, as there
    assert one.shape == expected[1].shape
    np.testing.assert_allclose(one, expected[1], atol=1e-4, rtol=0)


def test_our_names_and_theirs_are_one_option(encoder: Encoder) -> None:
    ours = encoder.encode(TEXTS, normalize=True, dimensions=8, show_progress=False)
    theirs = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=8, show_progress_bar=False)
    np.testing.assert_array_equal(ours, theirs)
    both = encoder.encode(TEXTS, normalize=True, normalize_embeddings=True)  # agreeing is fine
    np.testing.assert_array_equal(both, encoder.encode(TEXTS, normalize=True))
    with pytest.raises(ValueError, match="normalize=True and normalize_embeddings=False disagree"):
        encoder.encode(TEXTS, normalize=True, normalize_embeddings=False)
    with pytest.raises(ValueError, match="dimensions=8 and truncate_dim=4 disagree"):
        encoder.encode(TEXTS, dimensions=8, truncate_dim=4)


def _hand_built() -> np.ndarray:
    """Vectors with a constant dimension (zero range), exact zeros, and a width that is not a multiple of 8."""
    rng = np.random.default_rng(0)
    out = rng.normal(size=(40, 13)).astype(np.float32)
    out[:, 3] = 0.25
    out[::5, 7] = 0.0
    return out


@pytest.mark.parametrize("precision", EMBEDDING_PRECISIONS)
def test_quantizer_equals_sentence_transformers(precision: str) -> None:
    from sentence_transformers.util import quantize_embeddings as theirs

    vectors = _hand_built()
    ours = quantize_embeddings(vectors, precision)
    expected = theirs(vectors, precision=precision)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    if precision.endswith("int8"):
        ranges = np.vstack([vectors.min(axis=0) - 1, vectors.max(axis=0) + 1])
        np.testing.assert_array_equal(quantize_embeddings(vectors[:3], precision, ranges=ranges),
                                      theirs(vectors[:3], precision=precision, ranges=ranges))
        with pytest.raises(ValueError, match="at least two vectors"):
            quantize_embeddings(vectors[:1], precision)
        with pytest.raises(ValueError, match=r"ranges must be \[2, 13\]"):
            quantize_embeddings(vectors, precision, ranges=ranges[:, :4])
    assert quantize_embeddings(vectors[:0], precision).shape[0] == 0


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_encode_precision_equals_sentence_transformers(reference, encoder: Encoder, precision: str) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.encode(TEXTS, precision=precision)
        floats = reference.encode(TEXTS)
    actual = encoder.encode(TEXTS, precision=precision)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, quantize_embeddings(encoder.encode(TEXTS), precision))
    if precision.endswith("int8"):
        # The floats agree to 1e-4, so a value on a bucket edge may land one bucket over, and no further.
        assert np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max() <= 1
    else:
        differ = np.unpackbits(actual.view(np.uint8), axis=1) != np.unpackbits(expected.view(np.uint8), axis=1)
        assert (np.abs(floats[differ[:, : floats.shape[1]]]) < 1e-4).all()  # only signs of values near zero


def test_token_embeddings_equal_sentence_transformers(reference, encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    expected = reference.encode(TEXTS, output_value="token_embeddings")
    actual = encoder.encode(TEXTS, output_value="token_embeddings")
    assert len(actual) == len(expected)
    for ours, theirs in zip(actual, expected):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(encoder.encode(TEXTS[0], output_value="token_embeddings"), actual[0], atol=1e-6)
    with pytest.raises(ValueError, match="apply to sentence vectors"):
        encoder.encode(TEXTS, output_value="token_embeddings", normalize_embeddings=True)


def test_model_attributes_equal_sentence_transformers(reference, encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    assert encoder.get_sentence_embedding_dimension() == encoder.get_embedding_dimension() \
        == reference.get_embedding_dimension() == 32
    assert encoder.max_seq_length == reference.max_seq_length == 128
    a, b = encoder.encode(TEXTS[:3]), encoder.encode(TEXTS[3:])
    np.testing.assert_allclose(encoder.similarity(a, b), reference.similarity(a, b).numpy(), atol=1e-6)


def test_what_needs_torch_is_refused(encoder: Encoder) -> None:
    with pytest.raises(ValueError, match="convert_to_tensor=True .* does not use torch"):
        encoder.encode(TEXTS, convert_to_tensor=True)
    with pytest.raises(ValueError, match="convert_to_numpy=False .* does not use torch"):
        encoder.encode(TEXTS, convert_to_numpy=False)
    with pytest.raises(ValueError, match=r"loaded on cpu; .*EncoderConfig\(device='cuda:0'\)"):
        encoder.encode(TEXTS, device="cuda:0")
    with pytest.raises(ValueError, match="several processes"):
        encoder.encode(TEXTS, device=["cpu", "cpu"])
    with pytest.raises(ValueError, match="record no named prompts; pass the prompt text itself"):
        encoder.encode(TEXTS, prompt_name="query")
    with pytest.raises(ValueError, match=r"'int8-static' is a model variant, chosen at load: .*EncoderConfig"):
        encoder.encode(TEXTS, precision="int8-static")
    with pytest.raises(ValueError, match="must be one of float32, int8, uint8, binary, ubinary, got 'float16'"):
        encoder.encode(TEXTS, precision="float16")
    with pytest.raises(ValueError, match="at least two vectors"):  # as sentence-transformers: no ranges from one
        encoder.encode(TEXTS[0], precision="int8")
    with pytest.raises(ValueError, match="output_value must be"):
        encoder.encode(TEXTS, output_value=None)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected keyword argument 'normalise'; .*normalize_embeddings"):
        encoder.encode(TEXTS, normalise=True)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="prompt must be a str"):
        encoder.encode(TEXTS, prompt=3)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def st_cross(reranker: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder as StCrossEncoder

    return StCrossEncoder(str(reranker[0]), device="cpu")


def test_cross_encoder_keywords_equal_sentence_transformers(st_cross, reranker: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    import torch

    ours = CrossEncoder(reranker[1])
    assert ours.num_labels == st_cross.num_labels == 1
    assert ours.max_seq_length == st_cross.max_seq_length
    for keywords in ({"batch_size": 2, "show_progress_bar": False, "convert_to_numpy": True}, {"prompt": "query: "}):
        np.testing.assert_allclose(ours.predict(PAIRS, **keywords), st_cross.predict(PAIRS, **keywords),
                                   atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.predict(PAIRS, activation_fn=np.tanh),
                               st_cross.predict(PAIRS, activation_fn=torch.nn.Tanh()), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a torch module"):
        ours.predict(PAIRS, activation_fn=torch.nn.Tanh())
    with pytest.raises(ValueError, match="convert_to_tensor=True asks CrossEncoder.predict"):
        ours.predict(PAIRS, convert_to_tensor=True)


def test_cross_encoder_softmax_equals_sentence_transformers(nli: tuple[Path, Path]) -> None:
    from sentence_transformers import CrossEncoder as StCrossEncoder

    theirs = StCrossEncoder(str(nli[0]), device="cpu").predict(PAIRS, apply_softmax=True)
    ours = CrossEncoder(nli[1]).predict(PAIRS, apply_softmax=True)
    assert ours.shape == theirs.shape == (len(PAIRS), 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_rank_reads_as_sentence_transformers(st_cross, reranker: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    ours = CrossEncoder(reranker[1])
    query, documents = PAIRS[0][0], [b for _, b in PAIRS]
    theirs = st_cross.rank(query, documents, return_documents=True, top_k=3)
    mine = ours.rank(query, documents, return_documents=True, top_k=3)
    assert [r["corpus_id"] for r in mine] == [r["corpus_id"] for r in theirs]
    assert [r["text"] for r in mine] == [r["text"] for r in theirs]
    np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in theirs], atol=1e-5)
    hits = ours.rank(query, documents, top_k=3, show_progress_bar=False)  # Hits, readable by the same keys
    assert all(isinstance(h, Hit) for h in hits)
    assert [(h["corpus_id"], h["score"]) for h in hits] == [(r["corpus_id"], r["score"]) for r in mine]
    with pytest.raises(KeyError, match="'corpus_id' and 'score'"):
        hits[0]["text"]  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected keyword argument 'apply_softmax'"):
        ours.rank(query, documents, apply_softmax=True)  # type: ignore[call-overload]
