"""``Encoder``: texts in, pooled sentence vectors out. Stage one (tokenization, batching), stage two (a
runner) and stage three (post-processing) are modules of their own; the encoder composes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from .batching import token_batches
from .config import EncoderConfig
from .contract import TASK_EMBEDDING, TOKEN_EMBEDDINGS
from .errors import NotExportedError
from .loader import LoadedAttributes, LoadedModel, load_model, loaded_property
from .postprocess import truncate_dimensions
from .runners import SessionRunner
from .session import ProviderList
from .tokenization import check_texts

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
        ValueError: ``providers`` and ``config.device`` both given, or ``cuda_graph`` without CUDA.

    One ``Encoder`` may be shared by threads: ONNX Runtime sessions and the tokenizer are thread-safe,
    ``encode`` keeps no state between calls, and the IO-binding runner serialises model calls with a lock.
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

    @overload
    def encode(
        self,
        texts: str,
        batch_size: int | None = ...,
        normalize: bool = ...,
        *,
        truncate: bool = ...,
        show_progress: bool = ...,
        dimensions: int | None = ...,
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
    ) -> np.ndarray: ...

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        normalize: bool = False,
        *,
        truncate: bool = True,
        show_progress: bool = False,
        dimensions: int | None = None,
    ) -> np.ndarray:
        """Encodes texts into float32 sentence vectors, in input order.

        Texts are sorted by token length and batched with their neighbours, so little padding is computed;
        work proceeds in chunks, so memory stays bounded however many texts are passed. Each batch is padded
        to a multiple of ``config.sequence_bucket`` tokens; with ``config.max_tokens``, a batch holds as many
        texts as fit that many padded tokens.

        Args:
            texts: a list of str, or a single str.
            batch_size: texts per model call; ``None``: 32, or no cap beyond ``config.max_tokens`` when set.
            normalize: L2-normalise each vector.
            truncate: cut texts longer than ``max_length`` tokens (default); if false, raise instead.
            show_progress: show a progress bar (tqdm) over the texts.
            dimensions: keep only the first ``dimensions`` components of each vector (Matryoshka truncation,
                for models trained for it). The truncated vectors are L2-normalised again when ``normalize``
                is true or the graph normalises its output (``model.normalize`` in the manifest).

        Returns:
            ``[len(texts), dimensions or hidden_size]`` float32; ``[dimensions or hidden_size]`` for a single str.

        Raises:
            TypeError: ``texts`` is not a list of str (the message names the first bad index).
            ValueError: ``batch_size`` < 1, ``dimensions`` outside 1..hidden_size, or ``truncate`` is false and a
                text is too long.
        """
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 1 <= dimensions <= self.hidden_size):
            raise ValueError(f"dimensions must be an int from 1 to {self.hidden_size} (the model's hidden size), "
                             f"got {dimensions!r}")
        if isinstance(texts, str):
            return self.encode([texts], batch_size, normalize, truncate=truncate, show_progress=show_progress,
                               dimensions=dimensions)[0]
        items = check_texts(texts)
        loaded = self.loaded
        out = np.empty((len(items), self.hidden_size), dtype=np.float32)
        for batch in token_batches(loaded.tokenizer, items, loaded.policy, batch_size, truncate=truncate,
                                   show_progress=show_progress):
            (vectors,) = loaded.runner.run(batch.input_ids, batch.attention_mask)
            out[batch.rows] = vectors[: len(batch.rows)]
        return truncate_dimensions(out, dimensions, normalize=normalize, graph_normalizes=self.manifest.normalize)

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
        runner = SessionRunner(loaded.session, (TOKEN_EMBEDDINGS,), shrink_tokens=loaded.shrink_tokens,
                               arena=loaded.arena)
        out: list[TokenEmbeddings | None] = [None] * len(items)
        for batch in token_batches(loaded.tokenizer, items, loaded.policy, batch_size, truncate=truncate,
                                   show_progress=show_progress, details=True):
            (hidden,) = runner.run(batch.input_ids, batch.attention_mask)
            for row, (index, encoding) in enumerate(zip(batch.rows, batch.encodings)):
                out[index] = TokenEmbeddings(tokens=list(encoding.tokens), offsets=list(encoding.offsets),
                                             vectors=hidden[row, : len(encoding.ids)].copy())
        return [item for item in out if item is not None]
