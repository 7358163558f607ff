"""The sentences shipped with the package (``data/sentences.txt``, 400 written for this project): the export's
default calibration and held-out texts for the precision variants, the training text of random checkpoints'
tokenizers, and the texts on which bf16 finds the activation outliers it keeps in fp32."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["HELD_OUT_STRIDE", "shipped_sentences", "split_sentences"]

# Every 4th shipped sentence (the 1st, 5th, 9th, ...; 100 of 400) is held out for the quality gate; the other 300
# are the calibration set (int8-static's scales, bf16's outlier search), so the gate never scores a text that
# calibration has seen.
HELD_OUT_STRIDE = 4


def shipped_sentences() -> list[str]:
    """The sentences shipped with the package (``runtime/data/sentences.txt``), one per line."""
    path = Path(__file__).with_name("data") / "sentences.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_sentences(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Returns ``(calibration, held_out)``: every ``HELD_OUT_STRIDE``-th text, from the first, is held out."""
    held = [text for i, text in enumerate(texts) if i % HELD_OUT_STRIDE == 0]
    rest = [text for i, text in enumerate(texts) if i % HELD_OUT_STRIDE != 0]
    return rest, held
