"""Stage one of three, first half: text -> token ids, and padding. Wraps a ``tokenizers.Tokenizer`` loaded from
``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import ContractMismatchError, ModelFolderError

__all__ = ["TextTokenizer", "bucket_width", "check_pairs", "check_texts", "lone_surrogate"]


def bucket_width(longest: int, multiple_of: int, max_length: int) -> int:
    """The padded width of a batch whose longest row has ``longest`` tokens: rounded up to ``multiple_of``,
    but never past ``max_length`` (nor below ``longest``), and at least one token."""
    longest = max(longest, 1)
    return min(-(-longest // multiple_of) * multiple_of, max(max_length, longest))


def check_texts(texts: object) -> list[str]:
    """Returns ``texts`` as a list of ``str``, or raises ``TypeError`` naming the first bad element."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(
            f"texts must be a list of str, got {type(texts).__name__}; wrap a single text in a list: [text]"
        )
    out = list(texts)
    for index, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, not str; every text must be a str")
    return out


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate code point in ``text``, or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_pairs(inputs: object, *, texts_allowed: bool) -> list[str | tuple[str, str]]:
    """Returns ``inputs`` as a list of texts and ``(text, text_pair)`` tuples (texts only if ``texts_allowed``),
    or raises ``TypeError`` naming the first bad element."""
    wanted = "a str or a (text, text_pair) pair of str" if texts_allowed else "a (text, text_pair) pair of str"
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list, each item {wanted}; got {type(inputs).__name__}")
    out: list[str | tuple[str, str]] = []
    for index, item in enumerate(inputs):
        if isinstance(item, str) and texts_allowed:
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append((item[0], item[1]))
        else:
            raise TypeError(f"inputs[{index}] is {type(item).__name__}; each item must be {wanted}")
    return out


class TextTokenizer:
    """Tokenizes to unpadded id lists (truncated to ``max_length``) and pads batches with numpy."""

    def __init__(self, path: Path, *, max_length: int, pad_id: int, vocab_limit: int | None = None) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelFolderError(f"{path} is not a valid tokenizer.json ({exc}); re-export the model.") from exc
        vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_limit is not None and vocab > vocab_limit:
            raise ContractMismatchError(
                f"{path} has {vocab} tokens but the model's embedding table has {vocab_limit} rows: ids past "
                f"{vocab_limit - 1} would index out of range. Export the tokenizer that belongs to this checkpoint."
            )
        # What the file itself declares (the export writes the model's maximum there), read before the runtime
        # sets its own truncation: a checksummed bound on the manifest's max_sequence_length.
        declared = self._tokenizer.truncation
        self.declared_max_length: int | None = int(declared["max_length"]) if declared else None
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.pad_id = pad_id
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which the runtime never needs.
        self._encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def encode(self, texts: list[str], *, truncate: bool = True, offset: int = 0) -> list[list[int]]:
        """Token ids per text, special tokens included.

        Raises:
            ValueError: ``truncate`` is false and a text is longer than ``max_length`` tokens (``offset`` is
                added to the index in the message, for callers that encode in chunks).
        """
        return [encoding.ids for encoding in self.encodings(texts, truncate=truncate, offset=offset)]

    def encodings(self, inputs: Sequence[str | tuple[str, str]], *, truncate: bool = True, offset: int = 0,
                  details: bool = False) -> list[Encoding]:
        """``tokenizers.Encoding`` per input (a text, or a ``(text, text_pair)`` tuple), special tokens included.

        With ``details`` the encodings carry token strings and character offsets (a little slower); pairs are
        truncated longest-first, as transformers does.

        Raises:
            ValueError: an input is not valid Unicode, or ``truncate`` is false and an input is longer than
                ``max_length`` tokens.
        """
        encode = self._tokenizer.encode_batch if details else self._encode_batch
        items = list(inputs)
        try:
            encodings = encode(items, add_special_tokens=True)
        except TypeError as exc:
            # The tokenizer cannot take a str with a lone surrogate (not valid Unicode); name the culprit.
            for index, item in enumerate(items):
                for text in (item,) if isinstance(item, str) else item:
                    position = lone_surrogate(text)
                    if position is not None:
                        raise ValueError(
                            f"texts[{index + offset}] is not valid Unicode: a lone surrogate "
                            f"U+{ord(text[position]):04X} at character {position}. Decode bytes with "
                            "errors='replace' (or drop the character) before encoding."
                        ) from exc
            raise
        if not truncate:
            for index, encoding in enumerate(encodings):
                if encoding.overflowing:
                    raise ValueError(
                        f"texts[{index + offset}] is longer than the model's maximum of {self.max_length} "
                        "tokens; shorten it, or pass truncate=True to keep its first tokens"
                    )
        return encodings

    def pad(self, sequences: Sequence[Sequence[int]], *, multiple_of: int = 1, fill: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads to the longest sequence (rounded up to ``multiple_of``, capped at ``max_length``) with
        ``fill`` (default the pad token's id).

        Returns ``(input_ids, attention_mask)``, both int64 ``[batch, sequence]``.
        """
        width = bucket_width(max((len(s) for s in sequences), default=1), multiple_of, self.max_length)
        ids = np.full((len(sequences), width), self.pad_id if fill is None else fill, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask
