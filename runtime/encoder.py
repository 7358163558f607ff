"""``Encoder``: texts in, pooled sentence vectors out. Tokenize -> run -> post-process, each replaceable."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
from tokenizers import Encoding

from ._batching import batch_capacity, plan_batches
from ._iobinding import IOBindingRunner
from ._session import (
    ProviderList,
    SessionRunner,
    SessionSettings,
    check_contract,
    create_session,
    parse_device,
    provider_names,
    resolve_providers,
    session_device,
)
from .tokenization import TextTokenizer, check_texts
from .contract import (
    PRECISIONS,
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

__all__ = [
    "PREFERRED_PRECISIONS",
    "Encoder",
    "EncoderConfig",
    "TokenEmbeddings",
    "best_precision",
    "normalize_rows",
]

logger = logging.getLogger("deberta_onnx")

_DEFAULT_BATCH_SIZE = 32
# Sequence bucket with IO binding: few enough widths (32 up to 512 tokens) that buffers are reused, at
# most 15 padding tokens a row.
_DEFAULT_IO_BINDING_BUCKET = 16

# The variant an Encoder loads when none is asked for, by first execution provider, best first. On CPU, int8
# runs on integer kernels and static int8 gives the same vector whatever the batch; fp16 has no fast CPU
# kernels. On CUDA, fp16 runs on tensor cores, while int8 graphs would dequantize back to float. Other
# providers get the manifest's ``default_variant``.
PREFERRED_PRECISIONS: dict[str, tuple[str, ...]] = {
    "CPUExecutionProvider": ("int8-static", "int8-dynamic", "fp32"),
    "CUDAExecutionProvider": ("fp16", "fp32"),
}


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """How an ``Encoder`` loads and runs its model. CLI flags of ``deberta-onnx embed`` map onto these fields.

    Attributes:
        precision: which exported variant to load (``"fp32"``, ``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``);
            ``None`` picks the best one the folder holds for the first provider (see ``PREFERRED_PRECISIONS``).
        intra_op_threads: ONNX Runtime threads inside one operator; ``None`` uses one per physical core.
        inter_op_threads: threads across operators; ``None`` keeps ONNX Runtime's default.
        allow_spinning: let idle ONNX Runtime threads spin (lower latency, busier cores); ``None`` keeps the default.
        verify_checksums: check every file's sha256 against the manifest at load (costs about 1 s per GB).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; short for a provider list (CUDA, then CPU for the few
            host-side nodes). ``None``: the ``providers`` argument decides, else the CPU.
        io_binding: run through IO binding, with device buffers reused per (batch, sequence) shape; ``None``:
            on with CUDA, off on the CPU. Embedding models only: classifiers and ``encode_tokens`` run
            through ``session.run``.
        sequence_bucket: pad each batch's length up to a multiple of this many tokens, so that few shapes
            occur; ``None``: 16 with IO binding, 1 (no extra padding) without.
        max_tokens: a token budget per batch (rows x padded length) instead of a fixed row count; a
            ``batch_size`` given to ``encode`` then caps the rows as well. ``None``: rows are ``batch_size``.
        max_buckets: most (batch, sequence) shapes whose IO-binding buffers are kept (least recently used
            freed first); with CUDA graphs, also the most graphs captured.
        cuda_graph: capture one CUDA graph per shape and replay it (needs CUDA and IO binding); batches are
            then padded to full rows so that few shapes occur.
    """

    precision: str | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    verify_checksums: bool = True
    device: str | None = None
    io_binding: bool | None = None
    sequence_bucket: int | None = None
    max_tokens: int | None = None
    max_buckets: int = 64
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None, got {self.precision!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        for name in ("sequence_bucket", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not _is_int(self.max_buckets) or self.max_buckets < 1:
            raise ValueError(f"max_buckets must be a positive int, got {self.max_buckets!r}")
        if self.device is not None:
            parse_device(self.device)
        if self.cuda_graph and self.io_binding is False:
            raise ValueError("cuda_graph needs io_binding (a graph replays fixed device buffers); drop io_binding=False")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def best_precision(variants: Iterable[str], provider: str, default: str = "fp32") -> tuple[str, str]:
    """The variant an ``Encoder`` loads on ``provider`` when none is asked for, and why.

    Args:
        variants: the precisions a model folder holds.
        provider: the first execution provider of the session.
        default: the manifest's ``default_variant``, used for providers without a preference.

    Returns:
        ``(precision, reason)``.
    """
    held = list(variants)
    for name in PREFERRED_PRECISIONS.get(provider, ()):
        if name in held:
            return name, f"the best variant in the folder for {provider}"
    return (default if default in held else held[0]), "the manifest's default"


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
        if self.config.cuda_graph and self.manifest.task != TASK_EMBEDDING:
            raise ValueError(f"cuda_graph runs embedding graphs through IO binding; {self.model_dir} holds a "
                             f"{self.manifest.task} model. Leave cuda_graph off.")
        self.providers = resolve_providers(providers, self.config.device, cuda_graph=self.config.cuda_graph)
        self.precision, self.precision_reason = self._pick_precision(self.config.precision)
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
        settings = SessionSettings(
            intra_op_threads=self.config.intra_op_threads,
            inter_op_threads=self.config.inter_op_threads,
            allow_spinning=self.config.allow_spinning,
        )
        self.session = create_session(model_path, self.providers, settings)
        check_contract(self.session, self.manifest, model_path)
        device, device_id = session_device(self.session)
        self.device = device if device == "cpu" else f"{device}:{device_id}"
        io_binding = self.config.io_binding if self.config.io_binding is not None else device == "cuda"
        task = self.manifest.task
        if io_binding and task != TASK_EMBEDDING:
            if self.config.io_binding:
                raise ValueError(f"io_binding runs embedding graphs; {self.model_dir} holds a {task} model. "
                                 "Leave io_binding unset (None) or False.")
            io_binding = False
        self.runner: SessionRunner | IOBindingRunner
        if io_binding:
            self.runner = IOBindingRunner(
                self.session,
                hidden_size=self.hidden_size,
                device=device,
                device_id=device_id,
                max_buckets=self.config.max_buckets,
                cuda_graph=self.config.cuda_graph,
            )
        else:
            self.runner = SessionRunner(self.session, (REQUIRED_OUTPUT[task],))
        self._token_types = any(spec.name == TOKEN_TYPE_IDS for spec in self.manifest.inputs)
        self.sequence_bucket = self.config.sequence_bucket or (_DEFAULT_IO_BINDING_BUCKET if io_binding else 1)
        logger.info(
            "loaded %s: precision %s (%s) on %s, %s", model_path, self.precision, self.precision_reason,
            self.session.get_providers()[0], "IO binding" if io_binding else "session.run",
        )

    def _check_task(self) -> None:
        task = self.manifest.task
        if task not in self._TASKS:
            loader = _LOADERS.get(task, "a newer deberta-onnx")
            raise TaskMismatchError(
                f"{self.model_dir} holds a model of task {task!r}, which {type(self).__name__} cannot run; load "
                f"it with {loader} (from deberta_onnx.runtime), or export the checkpoint with --task "
                f"{' or '.join(self._TASKS)}."
            )

    def _pick_precision(self, requested: str | None) -> tuple[str, str]:
        """The variant to load and why."""
        variants = self.manifest.variants
        if requested is not None:
            if requested not in variants:
                raise ValueError(
                    f"precision {requested!r} is not in {self.model_dir}; it holds {sorted(variants)}. Export "
                    f"the folder again with every precision you need: `deberta-onnx export SRC {self.model_dir} "
                    f"--overwrite --precision {','.join(sorted({*variants, requested}))}`."
                )
            return requested, "requested"
        provider = provider_names(self.providers)[0]
        return best_precision(variants, provider, str(self.manifest.data.get("default_variant", "fp32")))

    @property
    def hidden_size(self) -> int:
        """Length of each sentence vector."""
        return self.manifest.hidden_size

    @property
    def max_length(self) -> int:
        """Longest input in tokens (special tokens included); longer texts are truncated."""
        return self.tokenizer.max_length

    def _batches(self, items: Sequence[str | tuple[str, str]], batch_size: int | None, *, truncate: bool,
                 show_progress: bool, details: bool = False) -> Iterator[_Batch]:
        """Tokenizes ``items`` chunk by chunk and yields padded batches of neighbours in token length.

        Each batch is padded to a multiple of ``sequence_bucket`` tokens; with ``config.max_tokens`` it holds as
        many inputs as fit that many padded tokens (``batch_size`` then caps the rows). With CUDA graphs a short
        batch is filled with empty rows up to a full one (``rows`` names only the real ones).

        Raises:
            ValueError: ``batch_size`` is neither None nor a positive int, or ``truncate`` is false and an
                input is too long.
        """
        if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        max_tokens = self.config.max_tokens
        rows_cap = batch_size if batch_size is not None or max_tokens is not None else _DEFAULT_BATCH_SIZE
        bucket = self.sequence_bucket
        # CUDA graphs replay fixed shapes: a short last batch is padded with empty rows to a full one.
        fill_rows = self.config.cuda_graph
        progress = _progress(len(items), show_progress)
        widest_batch = batch_capacity(bucket, batch_size=rows_cap, max_tokens=max_tokens)
        try:
            for start, stop in _chunks(len(items), widest_batch):
                encodings = self.tokenizer.encodings(items[start:stop], truncate=truncate, offset=start,
                                                     details=details)
                # Longest first: the first batch shows at once whether memory suffices.
                order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
                plan = plan_batches(
                    [len(encodings[i].ids) for i in order],
                    batch_size=rows_cap,
                    max_tokens=max_tokens,
                    multiple_of=bucket,
                    max_length=self.max_length,
                )
                for planned in plan:
                    rows = order[planned.start : planned.stop]
                    chosen = [encodings[i] for i in rows]
                    sequences = [e.ids for e in chosen]
                    if fill_rows:
                        sequences += [[]] * (planned.capacity - len(rows))
                    input_ids, mask = self.tokenizer.pad(sequences, multiple_of=bucket)
                    types = None
                    if self._token_types:
                        types = self.tokenizer.pad([e.type_ids for e in chosen], multiple_of=bucket, fill=0)[0]
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
        if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= self.hidden_size):
            raise ValueError(f"dimensions must be an int from 1 to {self.hidden_size} (the model's hidden size), "
                             f"got {dimensions!r}")
        if isinstance(texts, str):
            return self.encode([texts], batch_size, normalize, truncate=truncate, show_progress=show_progress,
                               dimensions=dimensions)[0]
        items = check_texts(texts)
        out = np.empty((len(items), self.hidden_size), dtype=np.float32)
        for batch in self._batches(items, batch_size, truncate=truncate, show_progress=show_progress):
            (vectors,) = self.runner.run(batch.input_ids, batch.attention_mask)
            out[batch.rows] = vectors[: len(batch.rows)]
        if dimensions is not None and dimensions < self.hidden_size:
            out = np.ascontiguousarray(out[:, :dimensions])
            normalize = normalize or self.manifest.normalize
        return normalize_rows(out) if normalize else out

    @overload
    def encode_tokens(self, texts: str, batch_size: int | None = ..., *, truncate: bool = ...,
                      show_progress: bool = ...) -> TokenEmbeddings: ...
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
    step = min(max(batch_size * 64, 4096), 65536)
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _progress(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tokenizers depends on tqdm (through huggingface_hub); imported only when asked

    return tqdm(total=total, unit="text", desc="encode")
