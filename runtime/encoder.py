"""``Encoder``: texts in, pooled sentence vectors out. Stage one (tokenization, batching), stage two (a
runner) and stage three (post-processing) are modules of their own; the encoder composes them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import numpy as np

from .batching import ModelCall, TokenBatch, capped, token_batches
from .checks import check_positive_int
from .config import EncoderConfig
from .contract import TASK_EMBEDDING, TOKEN_EMBEDDINGS
from .errors import NotExportedError
from .loader import LoadedAttributes, LoadedModel, load_model, loaded_property
from .postprocess import quantize_embeddings, truncate_dimensions
from .sentence_transformers_api import EncodeKeywords, alias, check_embedding_precision, check_keywords, with_prompt
from .session import ProviderList
from .similarity import cos_sim
from .tokenization import check_texts

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Encoder", "TokenEmbeddings"]


@dataclass(frozen=True)
class TokenEmbeddings:
    """One text's contextualised token vectors, padding removed.

    Attributes:
        tokens: the token strings, special tokens ([CLS], [SEP]) included.
        offsets: each token's ``(start, end)`` character span in the text (``(0, 0)`` for special tokens).
        vectors: float32 ``[len(tokens), hidden_size]``, the encoder's last hidden state.
    """

    tokens: list[str]
    offsets: list[tuple[int, int]]
    vectors: np.ndarray


class Encoder(LoadedAttributes):
    """Encodes texts into sentence vectors with an exported deberta-onnx model folder.

    Args:
        model_dir: a folder written by ``deberta-onnx export`` (``model.onnx``, ``tokenizer.json``, ``manifest.json``).
        providers: ONNX Runtime execution providers in order of preference; default ``config.device``, else
            the CPU provider.
        config: loading, device, batching and threading options, see ``EncoderConfig``.

    Raises:
        ModelFolderError: (or a subclass) the folder is missing, corrupted, or disagrees with its manifest.
        TaskMismatchError: the folder holds a classifier, not an embedding model.
        ProviderUnavailableError: a requested provider is not installed or ONNX Runtime fell back from it.
        CudaGraphError: ``config.cuda_graph`` is set and ONNX Runtime refused CUDA graphs for this model.
        MemoryLimitError: one input of the folder's maximum length would need more than
            ``config.max_call_memory_mb``.
        ValueError: ``providers`` and ``config.device`` both given, or ``cuda_graph`` without CUDA.

    One ``Encoder`` may be shared by threads: ONNX Runtime sessions and the tokenizer are thread-safe,
    ``encode`` keeps no state between calls, and the IO-binding runner serialises model calls with a lock (with
    CUDA graphs, on one thread of its own: ONNX Runtime keeps captured graphs per thread).
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        self.loaded: LoadedModel = load_model(model_dir, providers, self.config, tasks=(TASK_EMBEDDING,),
                                              user=type(self).__name__)

    hidden_size = loaded_property(lambda m: m.hidden_size, "Length of each sentence vector.")

    def token_count(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model sees per text (special tokens included, after truncation).

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: a text is not valid Unicode.
        """
        return [len(ids) for ids in self.loaded.tokenizer.encode(check_texts(texts))]

    def get_embedding_dimension(self) -> int:
        """Length of each sentence vector (sentence-transformers' name; ``hidden_size`` here)."""
        return self.hidden_size

    def get_sentence_embedding_dimension(self) -> int:
        """Length of each sentence vector (sentence-transformers' older name; ``hidden_size`` here)."""
        return self.hidden_size

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity of every vector of ``a`` with every vector of ``b``, ``[len(a), len(b)]``, as
        sentence-transformers' ``similarity`` gives by default (numpy here, not a tensor). See ``cos_sim``."""
        return cos_sim(a, b)

    @overload
    def encode(  # type: ignore[overload-overlap]  # a str is a Sequence[str]; the first match wins
        self,
        texts: str,
        batch_size: int | None = ...,
        normalize: bool = ...,
        *,
        truncate: bool = ...,
        show_progress: bool = ...,
        dimensions: int | None = ...,
        prompt: str | None = ...,
        precision: str = ...,
        output_value: Literal["sentence_embedding", "token_embeddings"] = ...,
        **keywords: Unpack[EncodeKeywords],
    ) -> np.ndarray: ...
    @overload
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int | None = ...,
        normalize: bool = ...,
        *,
        truncate: bool = ...,
        show_progress: bool = ...,
        dimensions: int | None = ...,
        prompt: str | None = ...,
        precision: str = ...,
        output_value: Literal["sentence_embedding"] = ...,
        **keywords: Unpack[EncodeKeywords],
    ) -> np.ndarray: ...
    @overload
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int | None = ...,
        normalize: bool = ...,
        *,
        truncate: bool = ...,
        show_progress: bool = ...,
        dimensions: int | None = ...,
        prompt: str | None = ...,
        precision: str = ...,
        output_value: Literal["token_embeddings"],
        **keywords: Unpack[EncodeKeywords],
    ) -> list[np.ndarray]: ...

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        normalize: bool = False,
        *,
        truncate: bool = True,
        show_progress: bool = False,
        dimensions: int | None = None,
        prompt: str | None = None,
        precision: str = "float32",
        output_value: str = "sentence_embedding",
        **keywords: Unpack[EncodeKeywords],
    ) -> np.ndarray | list[np.ndarray]:
        """Encodes texts into float32 sentence vectors, in input order.

        Texts are sorted by token length and batched with their neighbours, so little padding is computed;
        work proceeds in chunks, so memory stays bounded however many texts are passed. Each batch is padded
        to a multiple of ``config.sequence_bucket`` tokens; with ``config.max_tokens``, a batch holds as many
        texts as fit that many padded tokens.

        sentence-transformers' ``SentenceTransformer.encode`` keywords are accepted too (``EncodeKeywords``):
        ``normalize_embeddings``, ``show_progress_bar`` and ``truncate_dim`` are other names for ``normalize``,
        ``show_progress`` and ``dimensions``; ``convert_to_numpy``, ``convert_to_tensor``, ``device`` and
        ``prompt_name`` are checked and refused where they would need torch or another device.

        Args:
            texts: a list of str, or a single str.
            batch_size: texts per model call; ``None``: 32, or no cap beyond ``config.max_tokens`` when set.
            normalize: L2-normalise each vector.
            truncate: cut texts longer than ``max_length`` tokens (default); if false, raise instead.
            show_progress: show a progress bar (tqdm) over the texts.
            dimensions: keep only the first ``dimensions`` components of each vector (Matryoshka truncation,
                for models trained for it). The truncated vectors are L2-normalised again when ``normalize``
                is true or the graph normalises its output (``model.normalize`` in the manifest).
            prompt: a text prepended to every text (e.g. ``"query: "``), as sentence-transformers' ``prompt``.
            precision: how the vectors are returned, as sentence-transformers' ``precision``: ``float32``
                (default), ``int8`` / ``uint8`` (per-dimension buckets over this call's vectors) or ``binary`` /
                ``ubinary`` (one bit per component, packed); see ``postprocess.quantize_embeddings``. Not the
                model variant, which is chosen at load (``EncoderConfig.precision``).
            output_value: ``"sentence_embedding"`` (default), or ``"token_embeddings"`` for each text's token
                vectors ``[tokens, hidden_size]`` (a list; the folder needs ``--token-embeddings``; see
                ``encode_tokens``, which also gives the tokens).

        Returns:
            ``[len(texts), dimensions or hidden_size]`` float32 (or the quantized dtype and width);
            ``[dimensions or hidden_size]`` for a single str. For ``token_embeddings``, a list of arrays.

        Raises:
            TypeError: ``texts`` is not a list of str (the message names the first bad index), or an unknown keyword.
            ValueError: ``batch_size`` < 1, ``dimensions`` outside 1..hidden_size, ``truncate`` is false and a
                text is too long, an unknown ``precision`` or ``output_value``, or a sentence-transformers keyword
                that cannot apply (see ``EncodeKeywords``).
            NotExportedError: ``token_embeddings`` from a folder exported without them.
        """
        check_keywords("Encoder.encode", keywords, EncodeKeywords, device=self.device)
        normalize = alias("normalize", normalize, False, "normalize_embeddings", keywords.get("normalize_embeddings"))
        show_progress = alias("show_progress", show_progress, False, "show_progress_bar",
                              keywords.get("show_progress_bar"))
        dimensions = alias("dimensions", dimensions, None, "truncate_dim", keywords.get("truncate_dim"))
        check_embedding_precision(precision)
        if output_value == "token_embeddings":
            if normalize or dimensions is not None or precision != "float32":
                raise ValueError("normalize, dimensions and precision apply to sentence vectors, not to "
                                 "output_value='token_embeddings'")
            if isinstance(texts, str):
                return self.encode_tokens(with_prompt([texts], prompt), batch_size, truncate=truncate,
                                          show_progress=show_progress)[0].vectors
            return [item.vectors for item in self.encode_tokens(with_prompt(check_texts(texts), prompt), batch_size,
                                                                truncate=truncate, show_progress=show_progress)]
        if output_value != "sentence_embedding":
            raise ValueError(f"output_value must be 'sentence_embedding' or 'token_embeddings', got {output_value!r}")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 1 <= dimensions <= self.hidden_size):
            raise ValueError(f"dimensions must be an int from 1 to {self.hidden_size} (the model's hidden size), "
                             f"got {dimensions!r}")
        single = isinstance(texts, str)
        items = with_prompt([texts] if isinstance(texts, str) else check_texts(texts), prompt)
        out = np.empty((len(items), self.hidden_size), dtype=np.float32)
        for call in self.plan(items, batch_size, truncate=truncate, show_progress=show_progress):
            out[call.rows] = call.run()
        out = truncate_dimensions(out, dimensions, normalize=normalize, graph_normalizes=self.manifest.normalize)
        if precision != "float32":
            out = quantize_embeddings(out, precision)
        return out[0] if single else out

    def plan(self, texts: Sequence[str], batch_size: int | None = None, *, truncate: bool = True,
             show_progress: bool = False, max_tokens: int | None = None) -> Iterator[ModelCall]:
        """``encode``'s work as separate model calls, tokenized and batched as ``encode`` does, run one by one by
        the caller: each ``call.run()`` gives the raw (unnormalised) vectors of ``call.rows``, which are positions
        in ``texts``. ``encode`` runs exactly these calls, so the vectors are the same.

        Tokenization happens as the iterator advances, a chunk at a time; nothing runs until ``run()`` is called.
        ``max_tokens`` caps each call's padded tokens below the model's own batching (``batching.capped``), so that
        no call runs longer than that many tokens take (the server stops between calls at a deadline).

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: ``batch_size`` or ``max_tokens`` < 1 (at once), or ``truncate`` is false and a text is too
                long (when its chunk is tokenized).
        """
        items = check_texts(texts)
        check_positive_int("batch_size", batch_size, optional=True)
        check_positive_int("max_tokens", max_tokens, optional=True)
        loaded = self.loaded
        batches = token_batches(loaded.tokenizer, items, capped(loaded.policy, max_tokens), batch_size,
                                truncate=truncate, show_progress=show_progress)
        return (ModelCall(rows=batch.rows, token_counts=[len(e.ids) for e in batch.encodings],
                          run=partial(self._run_batch, batch), padded_tokens=batch.input_ids.size)
                for batch in batches)

    def _run_batch(self, batch: TokenBatch) -> np.ndarray:
        (vectors,) = self.loaded.runner.run(batch.input_ids, batch.attention_mask)
        return vectors[: len(batch.rows)]

    @overload
    def encode_tokens(self, texts: str, batch_size: int | None = ..., *,  # type: ignore[overload-overlap]
                      truncate: bool = ..., show_progress: bool = ...) -> TokenEmbeddings: ...
    @overload
    def encode_tokens(self, texts: Sequence[str], batch_size: int | None = ..., *, truncate: bool = ...,
                      show_progress: bool = ...) -> list[TokenEmbeddings]: ...

    def encode_tokens(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        *,
        truncate: bool = True,
        show_progress: bool = False,
    ) -> TokenEmbeddings | list[TokenEmbeddings]:
        """Contextualised token vectors per text, without padding, with the tokens they belong to.

        Needs a folder exported with ``--token-embeddings``. Batching is as in ``encode``.

        Args:
            texts: a list of str, or a single str.
            batch_size: texts per model call (``None`` as in ``encode``).
            truncate: cut texts longer than ``max_length`` tokens (default); if false, raise instead.
            show_progress: show a progress bar (tqdm) over the texts.

        Returns:
            One ``TokenEmbeddings`` per text, in input order (a single one for a single str).

        Raises:
            NotExportedError: the folder was exported without the ``token_embeddings`` output.
            TypeError: ``texts`` is not a list of str.
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and a text is too long.
        """
        if not self.manifest.has_output(TOKEN_EMBEDDINGS):
            raise NotExportedError(
                f"{self.model_dir} was exported without token embeddings; export it again with "
                f"`deberta-onnx export SRC {self.model_dir} --token-embeddings --overwrite` "
                "(ExportConfig(token_embeddings=True))."
            )
        if self.config.cuda_graph:
            raise ValueError("encode_tokens reads a second output, which the CUDA graphs (captured for the sentence "
                             "vectors alone) cannot give; use an Encoder loaded without cuda_graph")
        if isinstance(texts, str):
            return self.encode_tokens([texts], batch_size, truncate=truncate, show_progress=show_progress)[0]
        items = check_texts(texts)
        loaded = self.loaded
        runner = loaded.runner_for((TOKEN_EMBEDDINGS,))
        out: list[TokenEmbeddings | None] = [None] * len(items)
        for batch in token_batches(loaded.tokenizer, items, loaded.policy, batch_size, truncate=truncate,
                                   show_progress=show_progress, details=True):
            (hidden,) = runner.run(batch.input_ids, batch.attention_mask)
            for row, (index, encoding) in enumerate(zip(batch.rows, batch.encodings)):
                out[index] = TokenEmbeddings(tokens=list(encoding.tokens), offsets=list(encoding.offsets),
                                             vectors=hidden[row, : len(encoding.ids)].copy())
        return [item for item in out if item is not None]
