"""``Encoder``: texts in, pooled sentence vectors out. Tokenize -> run -> post-process, each replaceable."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
from tokenizers import Encoding

from ._session import ProviderList, SessionRunner, SessionSettings, check_contract, create_session
from ._tokenize import TextTokenizer, check_texts
from .contract import (
    REQUIRED_OUTPUT,
    TASK_EMBEDDING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
    TOKEN_EMBEDDINGS,
    TOKEN_TYPE_IDS,
    TOKENIZER_FILE,
)
from .errors import ModelFolderError, NotExportedError, TaskMismatchError
from .manifest import load_manifest

__all__ = ["Encoder", "EncoderConfig", "TokenEmbeddings", "normalize_rows"]

logger = logging.getLogger("deberta_onnx")

_DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """How an ``Encoder`` loads and runs its model. CLI flags of ``deberta-onnx embed`` map onto these fields.

    Attributes:
        precision: which exported variant to load (``"fp32"``, ...); ``None`` picks the manifest's default.
        intra_op_threads: ONNX Runtime threads inside one operator; ``None`` uses one per physical core.
        inter_op_threads: threads across operators; ``None`` keeps ONNX Runtime's default.
        allow_spinning: let idle ONNX Runtime threads spin (lower latency, busier cores); ``None`` keeps the default.
        verify_checksums: check every file's sha256 against the manifest at load (costs about 1 s per GB).
    """

    precision: str | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalises each row; an all-zero row stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(vectors.dtype).tiny)


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


class _Batch(NamedTuple):
    rows: list[int]  # positions in the caller's input list
    encodings: list[Encoding]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None  # only for graphs that take segment ids


# Which class loads which task, for the error that names the right one.
_LOADERS = {
    TASK_EMBEDDING: "Encoder",
    TASK_SEQUENCE_CLASSIFICATION: "SequenceClassifier or CrossEncoder",
    TASK_TOKEN_CLASSIFICATION: "TokenClassifier",
}


class _OnnxModel:
    """Loading and batching shared by ``Encoder`` and the classifiers: manifest, checksums, tokenizer,
    session and contract checks, then length-sorted batches. Subclasses name the tasks they run."""

    _TASKS: tuple[str, ...] = (TASK_EMBEDDING,)

    def __init__(
        self, model_dir: str | Path, providers: ProviderList | None = None, *, config: EncoderConfig | None = None
    ) -> None:
        self.config = config or EncoderConfig()
        self.manifest = load_manifest(model_dir)
        self.model_dir = self.manifest.folder
        self._check_task()
        self.precision = self._pick_precision(self.config.precision)
        variant = self.manifest.variants[self.precision]
        model_path = self.model_dir / variant["file"]
        if self.config.verify_checksums:
            files = [variant["file"], *variant.get("extra_files", []), TOKENIZER_FILE]
            self.manifest.verify_files(files)
        elif not model_path.is_file():
            raise ModelFolderError(f"{model_path} is missing; re-export the model folder.")
        model = self.manifest.model
        self.tokenizer = TextTokenizer(
            self.model_dir / TOKENIZER_FILE,
            max_length=self.manifest.max_sequence_length,
            pad_id=int(model["pad_token_id"]),
            vocab_limit=int(model["vocab_size"]),
        )
        self.providers = list(providers) if providers is not None else list(_DEFAULT_PROVIDERS)
        settings = SessionSettings(
            intra_op_threads=self.config.intra_op_threads,
            inter_op_threads=self.config.inter_op_threads,
            allow_spinning=self.config.allow_spinning,
        )
        self.session = create_session(model_path, self.providers, settings)
        check_contract(self.session, self.manifest, model_path)
        self.runner = SessionRunner(self.session, (REQUIRED_OUTPUT[self.manifest.task],))
        self._token_types = any(spec.name == TOKEN_TYPE_IDS for spec in self.manifest.inputs)
        logger.info("loaded %s (%s) on %s", model_path, self.precision, self.session.get_providers()[0])

    def _check_task(self) -> None:
        task = self.manifest.task
        if task not in self._TASKS:
            loader = _LOADERS.get(task, "a newer deberta-onnx")
            raise TaskMismatchError(
                f"{self.model_dir} holds a model of task {task!r}, which {type(self).__name__} cannot run; load it with "
                f"{loader} (from deberta_onnx.runtime), or export the checkpoint with --task "
                f"{' or '.join(self._TASKS)}."
            )

    def _pick_precision(self, requested: str | None) -> str:
        variants = self.manifest.variants
        if requested is None:
            default = self.manifest.data.get("default_variant", "fp32")
            return default if default in variants else next(iter(variants))
        if requested not in variants:
            raise ValueError(
                f"precision {requested!r} is not in {self.model_dir}; it holds {sorted(variants)}. "
                f"Export it with `deberta-onnx export SRC {self.model_dir} --precision {requested}`."
            )
        return requested

    @property
    def hidden_size(self) -> int:
        """Length of each sentence vector."""
        return self.manifest.hidden_size

    @property
    def max_length(self) -> int:
        """Longest input in tokens (special tokens included); longer texts are truncated."""
        return self.tokenizer.max_length

    def _batches(self, items: Sequence[str | tuple[str, str]], batch_size: int, *, truncate: bool,
                 show_progress: bool, details: bool = False) -> Iterator[_Batch]:
        """Tokenizes ``items`` chunk by chunk and yields padded batches of neighbours in token length.

        Raises:
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and an input is too long.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        progress = _progress(len(items), show_progress)
        try:
            for start, stop in _chunks(len(items), batch_size):
                encodings = self.tokenizer.encodings(items[start:stop], truncate=truncate, offset=start,
                                                     details=details)
                # Longest first: the first batch shows at once whether memory suffices.
                order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
                for b in range(0, len(order), batch_size):
                    rows = order[b : b + batch_size]
                    chosen = [encodings[i] for i in rows]
                    input_ids, mask = self.tokenizer.pad([e.ids for e in chosen])
                    types = self.tokenizer.pad([e.type_ids for e in chosen], fill=0)[0] if self._token_types else None
                    yield _Batch([start + i for i in rows], chosen, input_ids, mask, types)
                    if progress is not None:
                        progress.update(len(rows))
        finally:
            if progress is not None:
                progress.close()


class Encoder(_OnnxModel):
    """Encodes texts into sentence vectors with an exported deberta-onnx model folder.

    Args:
        model_dir: a folder written by ``deberta-onnx export`` (``model.onnx``, ``tokenizer.json``, ``manifest.json``).
        providers: ONNX Runtime execution providers in order of preference; default the CPU provider.
        config: loading and threading options, see ``EncoderConfig``.

    Raises:
        ModelFolderError: (or a subclass) the folder is missing, corrupted, or disagrees with its manifest.
        TaskMismatchError: the folder holds a classifier, not an embedding model.
        ProviderUnavailableError: a requested provider is not installed or ONNX Runtime fell back from it.

    One ``Encoder`` may be shared by threads: ONNX Runtime sessions and the tokenizer are thread-safe and
    ``encode`` keeps no state between calls.
    """

    @overload
    def encode(
        self, texts: str, batch_size: int = ..., normalize: bool = ..., *, truncate: bool = ..., show_progress: bool = ...,
        dimensions: int | None = ...,
    ) -> np.ndarray: ...
    @overload
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = ...,
        normalize: bool = ...,
        *,
        truncate: bool = ...,
        show_progress: bool = ...,
        dimensions: int | None = ...,
    ) -> np.ndarray: ...

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        *,
        truncate: bool = True,
        show_progress: bool = False,
        dimensions: int | None = None,
    ) -> np.ndarray:
        """Encodes texts into float32 sentence vectors, in input order.

        Texts are sorted by token length and batched with their neighbours, so little padding is computed;
        work proceeds in chunks, so memory stays bounded however many texts are passed.

        Args:
            texts: a list of str, or a single str.
            batch_size: texts per model call.
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
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or not 1 <= dimensions <= self.hidden_size):
            raise ValueError(f"dimensions must be an int from 1 to {self.hidden_size} (the model's hidden size), "
                             f"got {dimensions!r}")
        if isinstance(texts, str):
            return self.encode([texts], batch_size, normalize, truncate=truncate, show_progress=show_progress,
                               dimensions=dimensions)[0]
        items = check_texts(texts)
        out = np.empty((len(items), self.hidden_size), dtype=np.float32)
        for batch in self._batches(items, batch_size, truncate=truncate, show_progress=show_progress):
            (vectors,) = self.runner.run(batch.input_ids, batch.attention_mask)
            out[batch.rows] = vectors
        if dimensions is not None and dimensions < self.hidden_size:
            out = np.ascontiguousarray(out[:, :dimensions])
            normalize = normalize or self.manifest.normalize
        return normalize_rows(out) if normalize else out

    @overload
    def encode_tokens(self, texts: str, batch_size: int = ..., *, truncate: bool = ...,
                      show_progress: bool = ...) -> TokenEmbeddings: ...
    @overload
    def encode_tokens(self, texts: Sequence[str], batch_size: int = ..., *, truncate: bool = ...,
                      show_progress: bool = ...) -> list[TokenEmbeddings]: ...

    def encode_tokens(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        *,
        truncate: bool = True,
        show_progress: bool = False,
    ) -> TokenEmbeddings | list[TokenEmbeddings]:
        """Contextualised token vectors per text, without padding, with the tokens they belong to.

        Needs a folder exported with ``--token-embeddings``. Batching is as in ``encode``.

        Args:
            texts: a list of str, or a single str.
            batch_size: texts per model call.
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
        if isinstance(texts, str):
            return self.encode_tokens([texts], batch_size, truncate=truncate, show_progress=show_progress)[0]
        items = check_texts(texts)
        runner = SessionRunner(self.session, (TOKEN_EMBEDDINGS,))
        out: list[TokenEmbeddings | None] = [None] * len(items)
        for batch in self._batches(items, batch_size, truncate=truncate, show_progress=show_progress, details=True):
            (hidden,) = runner.run(batch.input_ids, batch.attention_mask)
            for row, (index, encoding) in enumerate(zip(batch.rows, batch.encodings)):
                out[index] = TokenEmbeddings(tokens=list(encoding.tokens), offsets=list(encoding.offsets),
                                             vectors=hidden[row, : len(encoding.ids)].copy())
        return [item for item in out if item is not None]


def _chunks(total: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Splits ``range(total)`` into tokenization chunks of many batches each: large enough for length
    sorting to pay off, small enough that 100,000 texts never sit tokenized in memory at once."""
    step = max(batch_size * 64, 4096)
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _progress(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tokenizers depends on tqdm (through huggingface_hub); imported only when asked

    return tqdm(total=total, unit="text", desc="encode")
