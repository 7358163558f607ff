"""LlamaIndex: ``DebertaOnnxEmbedding``, a ``BaseEmbedding`` over an ``Encoder`` (needs the ``llamaindex``
extra, ``llama-index-core``).

    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode
    from deberta_onnx.runtime.integrations.llamaindex import DebertaOnnxEmbedding

    index = VectorStoreIndex([TextNode(text=t) for t in texts],
                             embed_model=DebertaOnnxEmbedding("models/deberta-v3-base"))
    index.as_retriever(similarity_top_k=3).retrieve("a question")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..installed import require_extra

require_extra("llamaindex", __name__)

from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from pydantic import PrivateAttr  # noqa: E402

from ..encoder import Encoder  # noqa: E402
from . import as_encoder  # noqa: E402

__all__ = ["DebertaOnnxEmbedding"]


class DebertaOnnxEmbedding(BaseEmbedding):
    """LlamaIndex's ``BaseEmbedding`` over ``Encoder.encode``. LlamaIndex hands it ``embed_batch_size`` texts at
    a time (default 10; raise it for throughput); the async methods run the same (blocking) calls.

    Args:
        model: an ``Encoder``, or a model folder to load one from.
        normalize: L2-normalise the vectors (default).
        query_prompt: prepended to queries, e.g. ``"query: "``.
        text_prompt: prepended to the texts indexed, e.g. ``"passage: "``.
        **kwargs: ``BaseEmbedding``'s fields (``embed_batch_size``, ``callback_manager``, ...).
    """

    normalize: bool = True
    query_prompt: str | None = None
    text_prompt: str | None = None
    _encoder: Encoder = PrivateAttr()

    def __init__(self, model: Encoder | str | Path, *, normalize: bool = True, query_prompt: str | None = None,
                 text_prompt: str | None = None, **kwargs: Any) -> None:
        encoder = as_encoder(model)
        super().__init__(model_name=str(encoder.model_dir), **kwargs)
        self.normalize, self.query_prompt, self.text_prompt = normalize, query_prompt, text_prompt
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "DebertaOnnxEmbedding"

    @property
    def encoder(self) -> Encoder:
        """The ``Encoder`` the vectors come from."""
        return self._encoder

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encoder.encode(query, normalize=self.normalize, prompt=self.query_prompt).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._encoder.encode(text, normalize=self.normalize, prompt=self.text_prompt).tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encoder.encode(list(texts), normalize=self.normalize, prompt=self.text_prompt).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embedding(text)
