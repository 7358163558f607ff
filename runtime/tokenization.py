"""Stage one of three, first half: text -> token ids, and padding. Wraps a ``tokenizers.Tokenizer`` loaded from
``tokenizer.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import ContractMismatchError, ModelFolderError

__all__ = ["TextTokenizer", "bucket_width", "check_pairs", "check_texts", "lone_surrogate"]

# A text longer than its character cut is tokenized from a prefix. A prefix too short to decide the text's
# truncation (whitespace runs, characters the normaliser drops, a word longer than the cut) is lengthened this many
# times over, at most _CUT_ROUNDS - 1 times: the last round's prefix is the most any text costs to tokenize.
_CUT_GROWTH = 4
_CUT_ROUNDS = 3
# The tokenizer pipelines whose tokens of a text's words do not depend on what follows the word's end: normalisers
# whose effect is local (a few characters), a pre-tokenizer that splits words at spaces, and a model that tokenizes
# each word alone. Other pipelines are tokenized in full.
_LOCAL_NORMALIZERS = {"Strip", "Replace", "Precompiled", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents",
                      "Prepend", "BertNormalizer", "Nmt"}
_WORD_SPLITTERS = {"Metaspace", "WhitespaceSplit", "Whitespace", "BertPreTokenizer"}
_LOCAL_PRE_TOKENIZERS = _WORD_SPLITTERS | {"Punctuation", "Digits", "UnicodeScripts"}


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
        # The same pipeline without truncation: the words of a text's prefix, before special tokens.
        self._words = Tokenizer.from_str(self._tokenizer.to_str())
        self._words.no_truncation()
        # Question-answering windows: the pipeline truncating only the context, with overflow (``windows``).
        self._windowed: dict[tuple[int, int], Tokenizer] = {}
        self._tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.pad_id = pad_id
        # encode_batch_fast skips character offsets, which the runtime never needs.
        self._encode_batch = self._tokenizer.encode_batch_fast
        # The most tokens of one text that can survive truncation, plus one that tells whether it was truncated.
        self.kept_tokens = max_length - self._tokenizer.num_special_tokens_to_add(False) + 1
        longest = _longest_piece(self._tokenizer) if _cuts_at_words(json.loads(self._tokenizer.to_str())) else None
        # Each token of the model covers at most `longest` characters of the normalised text, so kept_tokens take at
        # most kept_tokens * longest characters where the normaliser does not shrink the text; where it does, the
        # prefix is lengthened (see _prefixes). None: a pipeline this runtime cannot cut (tokenized in full).
        self.char_cut: int | None = self.kept_tokens * longest + longest if longest else None
        self.char_limit: int | None = (None if self.char_cut is None
                                       else self.char_cut * _CUT_GROWTH ** (_CUT_ROUNDS - 1))

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
        items = list(inputs)
        try:
            if self.char_cut is None:
                encode = self._tokenizer.encode_batch if details else self._encode_batch
                encodings = encode(items, add_special_tokens=True)
            else:
                encodings = self._cut_encodings(items, details)
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

    def _cut_encodings(self, items: list[str | tuple[str, str]], details: bool) -> list[Encoding]:
        """``encodings`` from each text's first ``kept_tokens`` tokens, tokenized from a prefix of at most
        ``char_limit`` characters, in groups of texts of at most ``char_limit`` characters together (counting each
        text as at most ``char_limit``), so that what is tokenized at once stays within a bound of the model's
        maximum length; a text that occurs several times (a rerank query in each of its pairs) is tokenized once
        per group.

        Truncation gives the same encodings as from the whole texts: the truncated part of a text is a prefix of
        its tokens, ``kept_tokens`` of them decide whether (and for a pair, how) it is truncated, and a pair
        truncated longest first keeps as many of each text's tokens whether the longer one had ``kept_tokens`` or
        more (its share never exceeds ``max_length`` less the special tokens, which is below ``kept_tokens``).
        """
        assert self.char_limit is not None
        process = self._tokenizer.post_process
        out: list[Encoding] = []
        start = 0
        while start < len(items):
            group: dict[str, None] = {}
            size = 0
            stop = start
            while stop < len(items):
                item = items[stop]
                new = [t for t in ((item,) if isinstance(item, str) else item) if t not in group]
                grown = size + sum(min(len(t), self.char_limit) for t in new)
                if stop > start and grown > self.char_limit:
                    break
                group.update(dict.fromkeys(new))
                size = grown
                stop += 1
            words = dict(zip(group, self._prefixes(list(group), details)))
            for encoding in words.values():
                # Past kept_tokens a text's tokens change nothing; cut here, a pair's truncation leaves each text one
                # short overflowing part instead of every combination of its long texts' parts.
                encoding.truncate(self.kept_tokens)
            counts: dict[str, int] = {}
            for item in items[start:stop]:
                if isinstance(item, str):
                    out.append(process(words[item]))
                    continue
                first, second = words[item[0]], words[item[1]]
                if len(first) == len(second) == self.kept_tokens and item[0] != item[1]:
                    # Both were cut: which text is longer decides which keeps the odd token of an odd share.
                    # Tell the truncation by cutting the shorter one token shorter (still past its share).
                    lengths = [counts.get(t) or counts.setdefault(t, self._count(t)) for t in item]
                    if lengths[0] != lengths[1]:
                        shorter = Encoding.merge([first if lengths[0] < lengths[1] else second], growing_offsets=False)
                        shorter.truncate(self.kept_tokens - 1)
                        first, second = (shorter, second) if lengths[0] < lengths[1] else (first, shorter)
                out.append(process(first, second))
            start = stop
        return out

    def _count(self, text: str) -> int:
        """Tokens of a whole text (no special tokens), counted in windows that end at spaces (each at most
        ``char_limit`` characters, or as far as a longer word goes up to four times that), so that a long text is
        never tokenized at once."""
        assert self.char_limit is not None
        count = 0
        start = 0
        while start < len(text):
            stop = start + self.char_limit
            if stop < len(text):
                space = text.rfind(" ", start + 1, stop)
                if space == -1:
                    space = text.find(" ", stop, start + 4 * self.char_limit)
                stop = start + 4 * self.char_limit if space == -1 else space
            count += len(self._words.encode(text[start:stop], add_special_tokens=False).ids)
            start = stop
        return count

    def _prefixes(self, texts: list[str], details: bool) -> list[Encoding]:
        """Per text, an encoding (no special tokens) whose first ``kept_tokens`` tokens are those of the whole text:
        the whole text's, or a prefix's that ends at a space past the last of those tokens, so that what follows
        cannot change them. A prefix too short for that is lengthened ``_CUT_GROWTH`` times, up to ``char_limit``
        characters, whose encoding is taken as it is (documented: such a text's first ``char_limit`` characters are
        what the model sees)."""
        assert self.char_cut is not None
        out: list[Encoding | None] = [None] * len(texts)
        cut = self.char_cut
        whole = [i for i, text in enumerate(texts) if len(text) <= cut]
        encode = self._words.encode_batch if details else self._words.encode_batch_fast
        for i, encoding in zip(whole, encode([texts[i] for i in whole], add_special_tokens=False)):
            out[i] = encoding
        todo = [i for i, text in enumerate(texts) if len(text) > cut]
        for round_ in range(_CUT_ROUNDS):
            pieces = [texts[i][:cut] for i in todo]
            # With character offsets, which say where a prefix's tokens end.
            encoded = self._words.encode_batch(pieces, add_special_tokens=False)
            retry = []
            for index, piece, encoding in zip(todo, pieces, encoded):
                if round_ == _CUT_ROUNDS - 1 or len(piece) == len(texts[index]) or self._decides(piece, encoding):
                    out[index] = encoding
                else:
                    retry.append(index)
            todo = retry
            if not todo:
                break
            cut *= _CUT_GROWTH
        return out  # type: ignore[return-value]

    def _decides(self, piece: str, encoding: Encoding) -> bool:
        """Whether a prefix's first ``kept_tokens`` tokens are the whole text's: there are that many, and the last
        of them ends at or before a space of the prefix (the pre-tokenizer splits words there, and the normaliser
        acts within a few characters)."""
        if len(encoding.ids) < self.kept_tokens:
            return False
        end = encoding.offsets[self.kept_tokens - 1][1]
        return piece.find(" ", end) != -1

    def windows(self, question: str, context: str, *, max_length: int, stride: int) -> list[Encoding]:
        """The ``(question, context)`` pair as windows of at most ``max_length`` tokens: the question whole in each,
        the context cut into pieces that overlap by ``stride`` tokens (truncation ``only_second`` with overflow, as
        transformers' fast tokenizers and its question-answering pipeline make them), with character offsets.

        Raises:
            ValueError: ``max_length`` is over the model's maximum, or the question leaves no more than ``stride``
                context tokens per window (tokenizers would stop the process); the message gives the counts.
        """
        if not 0 <= stride < max_length <= self.max_length:
            raise ValueError(f"windows need 0 <= stride < max_length <= the model's maximum ({self.max_length}); got "
                             f"stride {stride}, max_length {max_length}")
        question_tokens = len(self._words.encode(question, add_special_tokens=False).ids)
        room = max_length - self._tokenizer.num_special_tokens_to_add(True) - question_tokens
        if room <= stride:
            raise ValueError(
                f"the question is {question_tokens} tokens long: a window of {max_length} tokens then holds {room} "
                f"context tokens, and must hold more than the {stride} that windows overlap by. Shorten the question, "
                "or lower doc_stride (or raise max_seq_len, up to the model's maximum)."
            )
        windowed = self._windowed.get((max_length, stride))
        if windowed is None:
            windowed = Tokenizer.from_str(self._words.to_str())
            windowed.enable_truncation(max_length, stride=stride, strategy="only_second")
            self._windowed[max_length, stride] = windowed
        first = windowed.encode(question, context, add_special_tokens=True)
        return [first, *first.overflowing]

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



def _longest_piece(tokenizer: Tokenizer) -> int:
    """The most characters one token of the model's vocabulary stands for (special and added tokens, which the
    tokenizer splits off before the model, aside)."""
    added = set(tokenizer.get_added_tokens_decoder()) if hasattr(tokenizer, "get_added_tokens_decoder") else set()
    pieces = [piece for piece, index in tokenizer.get_vocab(with_added_tokens=False).items() if index not in added]
    return max((len(piece) for piece in pieces), default=1)


def _cuts_at_words(spec: dict[str, Any]) -> bool:
    """Whether a ``tokenizer.json``'s pipeline tokenizes each space-separated word independently of what follows it
    (see ``_LOCAL_NORMALIZERS``): then a text may be tokenized from a prefix that ends at a space."""
    model = spec.get("model") or {}
    if model.get("type") not in ("Unigram", "BPE", "WordPiece"):
        return False
    normalizer = spec.get("normalizer")
    normalizers = [] if normalizer is None else normalizer.get("normalizers", [normalizer])
    if normalizer is not None and normalizer.get("type") != "Sequence" and "normalizers" in normalizer:
        return False
    if not all(n.get("type") in _LOCAL_NORMALIZERS for n in normalizers):
        return False
    pre = spec.get("pre_tokenizer")
    if pre is None:
        return False
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not all(step.get("type") in _LOCAL_PRE_TOKENIZERS for step in steps):
        return False
    return any(step.get("type") in _WORD_SPLITTERS and step.get("split", True) for step in steps)
