"""The sentences shipped with the package (``data/sentences.txt``, 400 written for this project): the default
calibration and held-out texts of the precision variants, and the training text of random checkpoints'
tokenizers."""

from __future__ import annotations

from pathlib import Path

__all__ = ["shipped_sentences"]


def shipped_sentences() -> list[str]:
    """The sentences shipped with the package (``export/data/sentences.txt``), one per line."""
    path = Path(__file__).with_name("data") / "sentences.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
