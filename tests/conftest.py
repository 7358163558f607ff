"""Fixtures: tiny random DeBERTa-v2 checkpoints and a SentencePiece tokenizer trained on the spot.

Nothing here downloads anything. The weights are random: good for parity and speed, meaningless as embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Texts that stress tokenization and padding: accents, CJK, emoji (inside and outside the vocabulary),
# rare symbols, very long words, whitespace runs, and lengths from one token to past the maximum.
HARD_TEXTS = [
    "Hello world.",
    "café naïve façade résumé Zürich",
    "東京タワーと北京の天安門",
    "emoji 😀🎉👍🏽 ❤️ 🇫🇷",
    "Ω ≈ ç √ ∫ ∑ π ≤ ≥ ∞",
    "  leading and   inner   spaces\tand\ttabs\nand newlines  ",
    "Donaudampfschifffahrtsgesellschaftskapitänswitwe" * 3,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a",
    "",
    "ALL CAPS SHOUTING!!!",
    "mixed 123,456.78 €50 £3 ¥900 100km/h 37°C 5µm",
    "Ünïcödé ñ ß ø å æ œ",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "x" * 3000,
]

# Tiny DeBERTa-v2 configurations covering the attention variants: shared and separate relative-position
# keys, both disentangled terms, small position buckets, a conv layer (v2 style), and no relative attention.
_BASE = {
    "vocab_size": 4000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "max_position_embeddings": 512, "type_vocab_size": 0, "pad_token_id": 0,
    "hidden_act": "gelu", "layer_norm_eps": 1e-7,
}
TINY_CONFIGS = {
    "v3-shared": {**_BASE, "relative_attention": True, "position_buckets": 8, "max_relative_positions": -1,
                  "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
                  "position_biased_input": False},
    "v3-separate": {**_BASE, "relative_attention": True, "position_buckets": 16, "max_relative_positions": 64,
                    "pos_att_type": ["c2p", "p2c"], "share_att_key": False, "norm_rel_ebd": "none",
                    "position_biased_input": False},
    "v2-conv": {**_BASE, "relative_attention": True, "position_buckets": 32, "max_relative_positions": -1,
                "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
                "position_biased_input": True, "conv_kernel_size": 3, "conv_act": "gelu"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from deberta_onnx.runtime.session import cuda_available

    skip_gpu = pytest.mark.skip(reason="needs onnxruntime-gpu with a working CUDA device")
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from deberta_onnx.export import shipped_sentences

    return shipped_sentences()


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """A DeBERTa-v3-style SentencePiece model (byte fallback on), trained here on the shipped sentences."""
    from deberta_onnx.export import train_sentencepiece

    out = tmp_path_factory.mktemp("spm")
    train_sentencepiece(corpus, out, vocab_size=2000)
    return out


def _checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: list[str], name: str) -> Path:
    from deberta_onnx.export import build_random_checkpoint

    return build_random_checkpoint(TINY_CONFIGS[name], tmp_path_factory.mktemp(f"ckpt-{name}"), texts=corpus, seed=1)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """Each tiny checkpoint in turn."""
    return _checkpoint(tmp_path_factory, corpus, request.param)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """One tiny checkpoint, for tests that need any."""
    return _checkpoint(tmp_path_factory, corpus, "v3-shared")


def _export(src: Path, out: Path) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    export_model(src, out, ExportConfig(quiet=True))
    return out


@pytest.fixture(scope="session")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder) for each tiny checkpoint."""
    return checkpoint, _export(checkpoint, tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder exported from ``tiny_checkpoint``."""
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("export-tiny") / "model")


NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def build_classifier_checkpoint(tiny_checkpoint: Path, out: Path, *, task: str, labels: list[str],
                                type_vocab_size: int = 0, seed: int = 3) -> Path:
    """A tiny DeBERTa-v2 sequence or token classifier with random weights and the tiny checkpoint's tokenizer.

    The head is re-drawn with unit-scale weights: at transformers' initialisation (std 0.02) every logit is
    about 1e-3, too small for a 1e-4 parity check to mean anything."""
    import shutil

    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2ForTokenClassification

    config = DebertaV2Config(**{**TINY_CONFIGS["v3-shared"], "type_vocab_size": type_vocab_size},
                             id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    sequence = task == "sequence-classification"
    loader = DebertaV2ForSequenceClassification if sequence else DebertaV2ForTokenClassification
    torch.manual_seed(seed)
    model = loader(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("classifier.", "pooler.")):
                parameter.normal_(0.0, 0.3) if name.endswith("weight") else parameter.zero_()
    model.save_pretrained(out)
    for name in ("spm.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_checkpoint / name, out / name)
    return out


def _export_classifier(src: Path, out: Path) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    # transformers' tokenizer, so that PyTorch references tokenize exactly alike (README, "Tokenization").
    export_model(src, out, ExportConfig(quiet=True, tokenizer="transformers"))
    return out


@pytest.fixture(scope="session")
def nli(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a sequence classifier with three labels and no token types (as DeBERTa-v3)."""
    base = tmp_path_factory.mktemp("nli")
    src = build_classifier_checkpoint(tiny_checkpoint, base / "ckpt", task="sequence-classification",
                                      labels=NLI_LABELS)
    return src, _export_classifier(src, base / "model")


@pytest.fixture(scope="session")
def reranker(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a one-label cross-encoder with token type embeddings (type_vocab_size 2)."""
    base = tmp_path_factory.mktemp("reranker")
    src = build_classifier_checkpoint(tiny_checkpoint, base / "ckpt", task="sequence-classification",
                                      labels=["LABEL_0"], type_vocab_size=2, seed=3)
    return src, _export_classifier(src, base / "model")


@pytest.fixture(scope="session")
def ner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model folder): a token classifier with IOB labels."""
    base = tmp_path_factory.mktemp("ner")
    src = build_classifier_checkpoint(tiny_checkpoint, base / "ckpt", task="token-classification",
                                      labels=NER_LABELS, seed=5)
    return src, _export_classifier(src, base / "model")


@pytest.fixture(scope="session")
def sbert(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sentence-transformers folder, model folder): the tiny checkpoint saved by sentence-transformers with mean
    pooling, exported with transformers' tokenizer (so both tokenize alike) and the token vectors output. The
    PyTorch reference for the sentence-transformers call shape and the integrations."""
    import warnings

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    from deberta_onnx.export import ExportConfig, export_model

    base = tmp_path_factory.mktemp("sbert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = [modules.Transformer(str(tiny_checkpoint), max_seq_length=128),
                 modules.Pooling(32, pooling_mode="mean")]
        SentenceTransformer(modules=stack, device="cpu").save(str(base / "st"))
    export_model(base / "st", base / "model", ExportConfig(quiet=True, tokenizer="transformers", token_embeddings=True))
    return base / "st", base / "model"
