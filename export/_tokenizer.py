"""Writing ``tokenizer.json``: from the checkpoint's SentencePiece model where it has one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders
from transformers.convert_slow_tokenizer import DebertaV2Converter

__all__ = ["TOKENIZER_SOURCES", "build_tokenizer", "sentencepiece_tokenizer"]

# "sentencepiece": the checkpoint's spm.model as DeBERTa was trained with it (its nmt_nfkc normaliser and byte
#     fallback), converted by transformers' DeBERTa-v2 converter; the ids equal SentencePiece's.
# "transformers": whatever fast tokenizer the installed transformers builds, for byte-exact agreement with an
#     existing transformers pipeline (transformers 5 drops the normaliser and the byte fallback).
TOKENIZER_SOURCES = ("sentencepiece", "transformers")
SPM_FILE = "spm.model"


class _SentencePieceConverter(DebertaV2Converter):
    # tokenizers' Unigram model implements byte fallback; transformers leaves it off by default.
    handle_byte_fallback = True

    def decoder(self, replacement: str, add_prefix_space: bool) -> Any:
        # Byte pieces (<0xF0> ...) back to characters before the metaspace is turned into spaces.
        return decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                  super().decoder(replacement, add_prefix_space)])


class _SpmSource:
    """The attributes transformers' converter reads from a slow tokenizer, taken from the model file itself."""

    def __init__(self, vocab_file: str, *, do_lower_case: bool, split_by_punct: bool) -> None:
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self._processor = spm.SentencePieceProcessor(model_file=vocab_file)
        self.do_lower_case = do_lower_case
        self.split_by_punct = split_by_punct
        self.add_prefix_space = True
        self.legacy = True

    def convert_tokens_to_ids(self, token: str) -> int:
        return int(self._processor.piece_to_id(token))


def sentencepiece_tokenizer(spm_path: str | Path, *, do_lower_case: bool = False, split_by_punct: bool = False
                            ) -> Tokenizer:
    """A DeBERTa-v2/v3 ``spm.model`` as a fast tokenizer whose ids equal SentencePiece's: its normaliser
    (nmt_nfkc), byte fallback, and ``[CLS] A [SEP] (B [SEP])`` around the pieces."""
    source = _SpmSource(str(spm_path), do_lower_case=do_lower_case, split_by_punct=split_by_punct)
    return _SentencePieceConverter(source).converted()


def find_spm(src: str) -> str | None:
    """The checkpoint's ``spm.model`` (local folder or Hugging Face cache), or ``None``."""
    from transformers.utils import cached_file

    local = Path(src) / SPM_FILE
    if local.is_file():
        return str(local)
    try:
        return cached_file(src, SPM_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None


def build_tokenizer(src: str, hf_tokenizer: Any, source: str = "sentencepiece") -> tuple[Tokenizer, str]:
    """Returns the ``tokenizers.Tokenizer`` to save and a word for the manifest saying where it came from."""
    if source not in TOKENIZER_SOURCES:
        raise ValueError(f"tokenizer source must be one of {TOKENIZER_SOURCES}, got {source!r}")
    spm_path = find_spm(src) if source == "sentencepiece" else None
    if spm_path is None:
        tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        origin = "transformers" if source == "transformers" else "transformers (the checkpoint has no spm.model)"
    else:
        tokenizer = sentencepiece_tokenizer(
            spm_path, do_lower_case=bool(getattr(hf_tokenizer, "do_lower_case", False)),
            split_by_punct=bool(getattr(hf_tokenizer, "split_by_punct", False)))
        origin = "sentencepiece"
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, origin
