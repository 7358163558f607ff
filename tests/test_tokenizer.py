"""tokenizer.json against the SentencePiece model DeBERTa was trained with, on hard strings.

The default export converts the checkpoint's ``spm.model`` with its normaliser (nmt_nfkc) and byte fallback,
so the ids must equal SentencePiece's exactly. ``--tokenizer transformers`` keeps the installed transformers'
fast tokenizer instead; its ids must equal ``AutoTokenizer``'s (docs/export.md, "Tokenization").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from .conftest import HARD_TEXTS

EXTRA_HARD = [
    "ﬁne ligatures and ＦＵＬＬ　ＷＩＤＴＨ ①②③ x² ½",
    "Ελληνικά και русский текст вместе",
    "tab\tseparated\tvalues",
    "trailing spaces   ",
    "🤖🦾🧬 unseen emoji only",
    "中文、日本語、한국어 — mixed scripts…",
    "email: someone@example.com https://example.org/path?q=1&x=2",
    "zero\u200bwidth joiner\u200d and soft\u00adhyphen",
    "combining: e\u0301 n\u0303 a\u0308",
]


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "spm.model"))


def test_tokenizer_json_equals_sentencepiece(tiny_model: Path, processor, corpus: list[str]) -> None:  # type: ignore[no-untyped-def]
    fast = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert fast.truncation is not None and fast.truncation["max_length"] == 512  # the file declares the maximum
    fast.no_truncation()  # the comparison is of the tokenization itself, long texts whole
    for text in HARD_TEXTS + EXTRA_HARD + corpus:
        assert fast.encode(text).ids == [1, *processor.encode(text), 2], text


def test_byte_fallback_is_kept(tiny_model: Path, processor) -> None:  # type: ignore[no-untyped-def]
    fast = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    text = "🤖🦾🧬"
    pieces = fast.encode(text).tokens
    assert "<0xF0>" in pieces and "[UNK]" not in pieces
    assert fast.decode(fast.encode(text).ids).strip() == text


def test_known_difference_stacked_combining_marks(tiny_model: Path, processor) -> None:  # type: ignore[no-untyped-def]
    """Documented: tokenizers' Precompiled normaliser composes only the first of several stacked combining
    marks (A + U+0302 + U+0300 becomes "Â", SentencePiece gives "Ầ")."""
    fast = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    stacked = "A\u0302\u0300"
    assert fast.encode(stacked).ids != [1, *processor.encode(stacked), 2]
    assert fast.encode(stacked).ids == [1, *processor.encode("A\u0302"), 2]
    assert fast.encode("\u1ea6").ids == [1, *processor.encode("\u1ea6"), 2]  # precomposed: identical


def test_transformers_tokenizer_option_matches_autotokenizer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from deberta_onnx.export import ExportConfig, export_model

    out = tmp_path / "model"
    result = export_model(tiny_checkpoint, out, ExportConfig(quiet=True, tokenizer="transformers", validate=False))
    assert result.manifest["model"]["tokenizer_source"] == "transformers"
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    fast.no_truncation()
    reference = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in HARD_TEXTS + EXTRA_HARD:
        assert fast.encode(text).ids == reference(text)["input_ids"], text
