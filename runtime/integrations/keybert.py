"""KeyBERT: ``KeyBERTBackend``, an embedding backend over an ``Encoder`` (needs the ``keybert`` extra).

KeyBERT picks its backend by the model's type and loads a default sentence-transformers model for any type it
does not know, so an ``Encoder`` is handed to it through this backend:

    from keybert import KeyBERT
    from deberta_onnx.runtime.integrations.keybert import KeyBERTBackend

    keywords = KeyBERT(model=KeyBERTBackend("models/my-sbert")).extract_keywords(docs)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..installed import require_extra

require_extra("keybert", __name__)

from keybert.backend import BaseEmbedder  # noqa: E402

from ..encoder import Encoder  # noqa: E402
from . import as_encoder  # noqa: E402

__all__ = ["KeyBERTBackend"]


class KeyBERTBackend(BaseEmbedder):
    """KeyBERT's ``BaseEmbedder`` over ``Encoder.encode``, called as KeyBERT calls a sentence-transformers model.

    Args:
        model: an ``Encoder``, or a model folder to load one from.
        batch_size: texts per model call (``Encoder.encode``'s).
    """

    def __init__(self, model: Encoder | str | Path, *, batch_size: int | None = None) -> None:
        self.encoder = as_encoder(model)
        super().__init__(embedding_model=self.encoder)
        self.batch_size = batch_size

    def embed(self, documents: list[str], verbose: bool = False) -> np.ndarray:
        """``[len(documents), hidden_size]`` float32 vectors, in order; ``verbose`` shows a progress bar."""
        return self.encoder.encode(list(documents), batch_size=self.batch_size, show_progress_bar=verbose)
