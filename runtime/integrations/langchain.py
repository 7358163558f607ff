"""LangChain: ``DebertaOnnxEmbeddings``, an ``Embeddings`` over an ``Encoder`` (needs the ``langchain`` extra,
``langchain-core``).

    from langchain_core.vectorstores import InMemoryVectorStore
    from deberta_onnx.runtime.integrations.langchain import DebertaOnnxEmbeddings

    store = InMemoryVectorStore(DebertaOnnxEmbeddings("models/deberta-v3-base"))
    store.add_texts(["A sentence.", "Another one."])
    store.similarity_search("a question", k=1)
"""

from __future__ import annotations

from pathlib import Path

from ..installed import require_extra

require_extra("langchain", __name__)

from langchain_core.embeddings import Embeddings  # noqa: E402

from ..encoder import Encoder  # noqa: E402
from . import as_encoder  # noqa: E402

__all__ = ["DebertaOnnxEmbeddings"]


class DebertaOnnxEmbeddings(Embeddings):
    """LangChain's ``Embeddings`` interface over ``Encoder.encode``.

    Args:
        model: an ``Encoder``, or a model folder to load one from.
        normalize: L2-normalise the vectors (default), so cosine, dot product and L2 rank alike.
        batch_size: texts per model call (``Encoder.encode``'s).
        query_prompt: prepended to queries (``embed_query``), e.g. ``"query: "`` for models trained with one.
        document_prompt: prepended to documents (``embed_documents``), e.g. ``"passage: "``.
    """

    def __init__(self, model: Encoder | str | Path, *, normalize: bool = True, batch_size: int | None = None,
                 query_prompt: str | None = None, document_prompt: str | None = None) -> None:
        self.encoder = as_encoder(model)
        self.normalize = normalize
        self.batch_size = batch_size
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        return self.encoder.encode(list(texts), self.batch_size, self.normalize, prompt=self.document_prompt).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The query's vector."""
        return self.encoder.encode(text, self.batch_size, self.normalize, prompt=self.query_prompt).tolist()
