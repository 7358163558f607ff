"""What the benchmarks feed the models: a batch x sequence grid with padded rows, and a realistic text corpus."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deberta_onnx.runtime.manifest import ModelInfo

__all__ = [
    "DEFAULT_GRID", "QUICK_GRID", "Shape", "build_corpus", "fit_vocab", "grid_batch", "parse_shapes", "token_lengths",
]


@dataclass(frozen=True)
class Shape:
    """One grid point: ``batch`` rows of ``sequence`` tokens."""

    batch: int
    sequence: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.sequence}"


DEFAULT_GRID: tuple[Shape, ...] = (Shape(1, 32), Shape(8, 128), Shape(32, 128), Shape(128, 128), Shape(64, 512))
QUICK_GRID: tuple[Shape, ...] = (Shape(1, 32), Shape(8, 128))


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``"1x32,8x128"`` -> shapes; ``"none"`` -> no shapes (a corpus-only run).

    Raises:
        ValueError: an item is not ``BATCHxSEQUENCE`` with positive ints.
    """
    if text.strip().lower() == "none":
        return ()
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise ValueError(f"shape {item!r} is not BATCHxSEQUENCE with positive ints (e.g. 8x128)")
        shapes.append(Shape(int(match[1]), int(match[2])))
    return tuple(shapes)


def grid_batch(shape: Shape, *, vocab: int, pad_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids of ``shape``, the second half of the rows right-padded to random lengths.

    The first row is always full length, so the padded width is ``shape.sequence``; a batch of one has no padded
    row. Ids start at 5 to avoid DeBERTa-v3's special tokens. Deterministic for a given ``seed``.

    Returns:
        ``(input_ids, attention_mask)``, int64 ``[batch, sequence]``.
    """
    rng = np.random.default_rng([seed, shape.batch, shape.sequence])
    ids = rng.integers(5, max(vocab, 6), size=(shape.batch, shape.sequence), dtype=np.int64)
    lengths = np.full(shape.batch, shape.sequence)
    padded = shape.batch // 2
    if padded:
        lengths[shape.batch - padded:] = rng.integers(max(1, shape.sequence // 4), shape.sequence,
                                                      size=padded, endpoint=False)
    mask = (np.arange(shape.sequence)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = pad_id
    return ids, mask


def token_lengths(tokenizer_file: str | Path, texts: Sequence[str]) -> np.ndarray:
    """Tokens per text (special tokens included, no truncation) under a ``tokenizer.json``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return np.array([len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=True)])


def build_corpus(sentences: Sequence[str], tokenizer_file: str | Path, *, size: int = 10_000, min_tokens: int = 5,
                 max_tokens: int = 250, seed: int = 0) -> list[str]:
    """A deterministic corpus of ``size`` texts whose token lengths spread from ``min_tokens`` to ``max_tokens``.

    Target lengths follow a log-normal distribution (median 32 tokens, a long tail up to ``max_tokens``), the
    shape of real sentence-embedding traffic: mostly short sentences, some paragraphs. Each text is a run of
    consecutive words taken from the shipped sentences (all 19 languages), cut where its token count reaches
    the target. Token counts are those of ``tokenizer_file`` with special tokens included.

    Raises:
        ValueError: bad sizes, or ``sentences`` is empty.
    """
    if size < 1 or not 2 <= min_tokens <= max_tokens:
        raise ValueError(f"need size >= 1 and 2 <= min_tokens <= max_tokens, got {size}, {min_tokens}, {max_tokens}")
    words = [word for sentence in sentences for word in sentence.split()]
    if not words:
        raise ValueError("build_corpus needs at least one non-empty sentence")
    # SentencePiece splits on whitespace first, so a run of words costs about the sum of its words' pieces.
    costs = token_lengths(tokenizer_file, words) - 2
    rng = np.random.default_rng(seed)
    targets = np.clip(np.rint(rng.lognormal(np.log(32), 0.8, size=size)), min_tokens, max_tokens).astype(int)
    starts = rng.integers(0, len(words), size=size)
    runs: list[list[int]] = []
    for target, start in zip(targets, starts):
        budget = int(target) - 2
        picked: list[int] = []
        used = 0
        position = int(start)
        while used < budget and len(picked) < len(words):
            cost = int(costs[position])
            if picked and used + cost > budget + 2:
                break
            picked.append(position)
            used += cost
            position = (position + 1) % len(words)
        runs.append(picked)
    # Word costs taken one by one are off by a piece now and then; put stray texts back into the range.
    for _ in range(8):
        lengths = token_lengths(tokenizer_file, [" ".join(words[i] for i in run) for run in runs])
        several = np.array([len(r) for r in runs]) > 1
        stray = np.flatnonzero((lengths < min_tokens) | ((lengths > max_tokens) & several))
        if not stray.size:
            break
        for index in stray:
            run = runs[index]
            if lengths[index] < min_tokens:
                run.append((run[-1] + 1) % len(words))
            else:
                run.pop()
    return [" ".join(words[i] for i in run) for run in runs]


def fit_vocab(shape: Shape, model: ModelInfo, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``grid_batch`` for a model: ids drawn from its vocabulary, padding with its pad id."""
    return grid_batch(shape, vocab=model.vocab_size, pad_id=model.pad_token_id, seed=seed)
