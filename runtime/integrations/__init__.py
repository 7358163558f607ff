"""Adapters that plug an ``Encoder`` into the libraries people already embed with, one small module each, each
behind its own extra and imported only when used (``import deberta_onnx.runtime`` imports none of them):

- ``langchain``: ``DebertaOnnxEmbeddings``, a LangChain ``Embeddings`` (extra ``langchain``).
- ``chroma``: ``DebertaOnnxEmbeddingFunction``, a Chroma ``EmbeddingFunction`` (extra ``chroma``).
- ``llamaindex``: ``DebertaOnnxEmbedding``, a LlamaIndex ``BaseEmbedding`` (extra ``llamaindex``).
- ``keybert``: ``KeyBERTBackend``, a KeyBERT embedding backend (extra ``keybert``).

Each takes an ``Encoder`` or a model folder, and passes its options through to ``Encoder.encode``.
"""

from __future__ import annotations

from pathlib import Path

from ..encoder import Encoder

__all__ = ["as_encoder"]


def as_encoder(model: Encoder | str | Path) -> Encoder:
    """``model`` itself if it is an ``Encoder``, else an ``Encoder`` loaded from that folder with default options.

    Raises:
        TypeError: ``model`` is neither an ``Encoder`` nor a path.
        ModelFolderError: (or a subclass) as ``Encoder``.
    """
    if isinstance(model, Encoder):
        return model
    if isinstance(model, (str, Path)):
        return Encoder(model)
    raise TypeError(f"model must be an Encoder or a model folder (str or Path), got {type(model).__name__}")
