"""The adapters (deberta_onnx.runtime.integrations) driven through the real libraries: KeyBERT gives the keywords
it gives with the PyTorch reference model, LangChain's in-memory vector store, a Chroma collection and a
LlamaIndex vector index find what ``semantic_search`` finds; and the runtime imports none of those libraries.

Each test skips when its library is not installed (``pip install -e '.[langchain,chroma,llamaindex]'``; KeyBERT
is in the dev extra); CI installs them all."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder, semantic_search

LIBRARIES = ("torch", "transformers", "sentence_transformers", "keybert", "langchain_core", "chromadb", "llama_index")
# Makes importing the libraries above fail in the child, as on a machine with the base install only.
BLOCK = textwrap.dedent(
    f"""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {LIBRARIES!r}:
                raise ImportError(f"blocked: {{name}}")
            return None
    sys.meta_path.insert(0, _Block())
    """
)
QUERIES = ["Where do the trains stop at night?", "a recipe with tomatoes and basil"]


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def encoder(sbert: tuple[Path, Path]) -> Encoder:
    return Encoder(sbert[1])


@pytest.fixture(scope="module")
def docs(corpus: list[str]) -> list[str]:
    return corpus[:24]


def _expected(encoder: Encoder, docs: list[str], queries: list[str], k: int) -> list[list[tuple[int, float]]]:
    hits = semantic_search(encoder.encode(queries, normalize=True), encoder.encode(docs, normalize=True), top_k=k)
    return [[(h.index, h.score) for h in row] for row in hits]


def test_runtime_imports_none_of_them(tiny_model: Path) -> None:
    code = BLOCK + textwrap.dedent(
        """
        import deberta_onnx.runtime, deberta_onnx.runtime.integrations
        vector = deberta_onnx.runtime.Encoder(sys.argv[1]).encode("a text", show_progress_bar=False)
        print("LOADED", sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:])), vector.shape)
        """
    )
    result = _run(code, str(tiny_model), *LIBRARIES)
    assert result.returncode == 0, result.stderr
    assert "LOADED [] (32,)" in result.stdout


@pytest.mark.parametrize("module, extra", [("langchain", "langchain"), ("chroma", "chroma"),
                                           ("llamaindex", "llamaindex"), ("keybert", "keybert")])
def test_an_adapter_without_its_library_names_the_extra(module: str, extra: str) -> None:
    result = _run(BLOCK + f"import deberta_onnx.runtime.integrations.{module}")
    assert result.returncode == 1
    assert f"pip install 'deberta-onnx[{extra}]'" in result.stderr, result.stderr


@pytest.mark.slow
def test_keybert_gives_the_reference_keywords(sbert: tuple[Path, Path], encoder: Encoder, docs: list[str]) -> None:
    keybert = pytest.importorskip("keybert")
    from sentence_transformers import SentenceTransformer

    from deberta_onnx.runtime.integrations.keybert import KeyBERTBackend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = keybert.KeyBERT(model=SentenceTransformer(str(sbert[0]), device="cpu"))
    ours = keybert.KeyBERT(model=KeyBERTBackend(encoder, batch_size=8))
    for options in ({"top_n": 5}, {"keyphrase_ngram_range": (1, 2), "use_mmr": True, "diversity": 0.5},
                    {"use_maxsum": True, "nr_candidates": 10, "top_n": 3}):
        expected = reference.extract_keywords(docs[:8], **options)
        actual = ours.extract_keywords(docs[:8], **options)
        assert [[word for word, _ in doc] for doc in actual] == [[word for word, _ in doc] for doc in expected], options
        np.testing.assert_allclose([s for doc in actual for _, s in doc], [s for doc in expected for _, s in doc],
                                   atol=2e-4)  # KeyBERT rounds scores to 4 decimals
        assert len(actual) == 8 and sum(map(len, actual)) >= 16  # most texts gave keywords to compare


def test_langchain_in_memory_vector_store(sbert: tuple[Path, Path], encoder: Encoder, docs: list[str]) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.vectorstores import InMemoryVectorStore
    from sentence_transformers import SentenceTransformer

    from deberta_onnx.runtime.integrations.langchain import DebertaOnnxEmbeddings

    embeddings = DebertaOnnxEmbeddings(encoder)
    store = InMemoryVectorStore(embeddings)
    store.add_texts(docs, metadatas=[{"row": i} for i in range(len(docs))])
    for query, expected in zip(QUERIES, _expected(encoder, docs, QUERIES, 4)):
        found = store.similarity_search_with_score(query, k=4)
        assert [doc.metadata["row"] for doc, _ in found] == [i for i, _ in expected]
        assert [doc.page_content for doc, _ in found] == [docs[i] for i, _ in expected]
        np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=1e-5)
    # The vectors are the PyTorch reference's, and the async methods give the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SentenceTransformer(str(sbert[0]), device="cpu").encode(docs[:3], normalize_embeddings=True)
    np.testing.assert_allclose(embeddings.embed_documents(docs[:3]), reference, atol=1e-4)
    assert asyncio.run(embeddings.aembed_query(QUERIES[0])) == embeddings.embed_query(QUERIES[0])
    prompted = DebertaOnnxEmbeddings(sbert[1], query_prompt="query: ").embed_query(QUERIES[0])  # from a folder
    np.testing.assert_allclose(prompted, encoder.encode("query: " + QUERIES[0], normalize=True), atol=1e-6)


def test_chroma_collection_add_and_query(encoder: Encoder, docs: list[str], tmp_path: Path) -> None:
    chromadb = pytest.importorskip("chromadb")
    from chromadb.config import Settings

    from deberta_onnx.runtime.integrations.chroma import DebertaOnnxEmbeddingFunction

    client = chromadb.PersistentClient(path=str(tmp_path / "db"), settings=Settings(anonymized_telemetry=False))
    function = DebertaOnnxEmbeddingFunction(encoder)
    collection = client.create_collection("docs", embedding_function=function)
    collection.add(ids=[str(i) for i in range(len(docs))], documents=docs)
    expected = _expected(encoder, docs, QUERIES, 3)
    found = collection.query(query_texts=QUERIES, n_results=3)
    assert found["ids"] == [[str(i) for i, _ in row] for row in expected]
    assert found["documents"] == [[docs[i] for i, _ in row] for row in expected]
    # The collection's space is cosine (the function's default): distance = 1 - cosine.
    np.testing.assert_allclose(1 - np.array(found["distances"]), [[s for _, s in row] for row in expected], atol=1e-4)
    # Chroma stored the function's config with the collection: a new process rebuilds it from the folder.
    code = textwrap.dedent(
        """
        import json, sys
        import chromadb
        from chromadb.config import Settings
        import deberta_onnx.runtime.integrations.chroma
        client = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False))
        print(json.dumps(client.get_collection("docs").query(query_texts=sys.argv[2:], n_results=3)["ids"]))
        """
    )
    result = _run(code, str(tmp_path / "db"), *QUERIES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(found["ids"]).replace("'", '"')


def test_llamaindex_vector_index_retrieves(encoder: Encoder, docs: list[str]) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from deberta_onnx.runtime.integrations.llamaindex import DebertaOnnxEmbedding

    embed_model = DebertaOnnxEmbedding(encoder, embed_batch_size=8)
    index = VectorStoreIndex([TextNode(text=d, id_=str(i)) for i, d in enumerate(docs)], embed_model=embed_model)
    retriever = index.as_retriever(similarity_top_k=3)
    for query, expected in zip(QUERIES, _expected(encoder, docs, QUERIES, 3)):
        found = retriever.retrieve(query)
        assert [hit.node.node_id for hit in found] == [str(i) for i, _ in expected]
        np.testing.assert_allclose([hit.score for hit in found], [s for _, s in expected], atol=1e-5)
    assert asyncio.run(embed_model.aget_query_embedding(QUERIES[0])) == embed_model.get_query_embedding(QUERIES[0])
