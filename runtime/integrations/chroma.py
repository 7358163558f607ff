"""Chroma: ``DebertaOnnxEmbeddingFunction``, an ``EmbeddingFunction`` over an ``Encoder`` (needs the ``chroma``
extra, ``chromadb``; ``chromadb-client`` serves too, for a Chroma server).

    import chromadb
    from deberta_onnx.runtime.integrations.chroma import DebertaOnnxEmbeddingFunction

    collection = chromadb.EphemeralClient().create_collection(
        "docs", embedding_function=DebertaOnnxEmbeddingFunction("models/deberta-v3-base"))
    collection.add(ids=["a", "b"], documents=["A sentence.", "Another one."])
    collection.query(query_texts=["a question"], n_results=1)

The function is registered under the name ``deberta-onnx``, and Chroma stores its config (the model folder,
precision and normalisation) with the collection, so ``client.get_collection("docs")`` in a later process
rebuilds it once this module has been imported.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from ..installed import require_extra

require_extra("chroma", __name__)

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

from ..config import EncoderConfig  # noqa: E402
from ..encoder import Encoder  # noqa: E402
from . import as_encoder  # noqa: E402

__all__ = ["DebertaOnnxEmbeddingFunction"]

# Encoders alive in this process by (folder, precision): Chroma rebuilds the function from its config to check
# it (and on every get_collection); those rebuilds share the model already loaded instead of loading it again.
_LOADED: weakref.WeakValueDictionary[tuple[str, str], Encoder] = weakref.WeakValueDictionary()


@register_embedding_function
class DebertaOnnxEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma's ``EmbeddingFunction`` over ``Encoder.encode``.

    Args:
        model: an ``Encoder``, or a model folder to load one from.
        normalize: L2-normalise the vectors (default), so Chroma's ``cosine``, ``ip`` and ``l2`` spaces rank alike.
        batch_size: texts per model call (``Encoder.encode``'s).
        query_prompt: prepended to query texts, e.g. ``"query: "``, where Chroma embeds queries through
            ``embed_query`` (1.5 does; 1.0 calls the function itself, and so applies ``document_prompt``).
        document_prompt: prepended to documents, e.g. ``"passage: "``.
    """

    def __init__(self, model: Encoder | str | Path, *, normalize: bool = True, batch_size: int | None = None,
                 query_prompt: str | None = None, document_prompt: str | None = None) -> None:
        self.encoder = as_encoder(model)
        _LOADED[(str(self.encoder.model_dir), self.encoder.precision)] = self.encoder
        self.normalize = normalize
        self.batch_size = batch_size
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt

    def __call__(self, input: Documents) -> Embeddings:
        """One vector per document, in order."""
        return list(self.encoder.encode(list(input), self.batch_size, self.normalize, prompt=self.document_prompt))

    def embed_query(self, input: Documents) -> Embeddings:
        """One vector per query text, in order."""
        return list(self.encoder.encode(list(input), self.batch_size, self.normalize, prompt=self.query_prompt))

    @staticmethod
    def name() -> str:
        return "deberta-onnx"

    def default_space(self) -> Space:
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        return {"model_dir": str(self.encoder.model_dir), "precision": self.encoder.precision,
                "normalize": self.normalize, "batch_size": self.batch_size, "query_prompt": self.query_prompt,
                "document_prompt": self.document_prompt}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> DebertaOnnxEmbeddingFunction:
        folder, precision = config["model_dir"], config["precision"]
        encoder = _LOADED.get((folder, precision)) or Encoder(folder, config=EncoderConfig(precision=precision))
        return DebertaOnnxEmbeddingFunction(encoder, normalize=config["normalize"], batch_size=config["batch_size"],
                                            query_prompt=config["query_prompt"],
                                            document_prompt=config["document_prompt"])
