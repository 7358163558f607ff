"""``Encoder``: texts in, pooled sentence vectors out. Tokenize -> run -> post-process, each replaceable."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from ._session import ProviderList, SessionRunner, SessionSettings, check_contract, create_session, provider_names
from ._tokenize import TextTokenizer, check_texts
from .contract import PRECISIONS, TOKENIZER_FILE
from .errors import ModelFolderError
from .manifest import load_manifest

__all__ = ["PREFERRED_PRECISIONS", "Encoder", "EncoderConfig", "best_precision", "normalize_rows"]

logger = logging.getLogger("deberta_onnx")

_DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)

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
    """

    precision: str | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None, got {self.precision!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")


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


class Encoder:
    """Encodes texts into sentence vectors with an exported deberta-onnx model folder.

    Args:
        model_dir: a folder written by ``deberta-onnx export`` (``model.onnx``, ``tokenizer.json``, ``manifest.json``).
        providers: ONNX Runtime execution providers in order of preference; default the CPU provider.
        config: loading and threading options, see ``EncoderConfig``.

    Raises:
        ModelFolderError: (or a subclass) the folder is missing, corrupted, or disagrees with its manifest.
        ProviderUnavailableError: a requested provider is not installed or ONNX Runtime fell back from it.

    One ``Encoder`` may be shared by threads: ONNX Runtime sessions and the tokenizer are thread-safe and
    ``encode`` keeps no state between calls.
    """

    def __init__(
        self, model_dir: str | Path, providers: ProviderList | None = None, *, config: EncoderConfig | None = None
    ) -> None:
        self.config = config or EncoderConfig()
        self.manifest = load_manifest(model_dir)
        self.model_dir = self.manifest.folder
        self.providers = list(providers) if providers is not None else list(_DEFAULT_PROVIDERS)
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
        self.runner = SessionRunner(self.session)
        logger.info("loaded %s: precision %s (%s) on %s", model_path, self.precision, self.precision_reason,
                    self.session.get_providers()[0])

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
        provider = provider_names(self.providers)[0] if self.providers else _DEFAULT_PROVIDERS[0]
        return best_precision(variants, provider, str(self.manifest.data.get("default_variant", "fp32")))

    @property
    def hidden_size(self) -> int:
        """Length of each sentence vector."""
        return self.manifest.hidden_size

    @property
    def max_length(self) -> int:
        """Longest input in tokens (special tokens included); longer texts are truncated."""
        return self.tokenizer.max_length

    @overload
    def encode(
        self, texts: str, batch_size: int = ..., normalize: bool = ..., *, truncate: bool = ..., show_progress: bool = ...
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
    ) -> np.ndarray: ...

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        *,
        truncate: bool = True,
        show_progress: bool = False,
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

        Returns:
            ``[len(texts), hidden_size]`` float32; ``[hidden_size]`` for a single str.

        Raises:
            TypeError: ``texts`` is not a list of str (the message names the first bad index).
            ValueError: ``batch_size`` < 1, or ``truncate`` is false and a text is too long.
        """
        if isinstance(texts, str):
            return self.encode([texts], batch_size, normalize, truncate=truncate, show_progress=show_progress)[0]
        items = check_texts(texts)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        out = np.empty((len(items), self.hidden_size), dtype=np.float32)
        progress = _progress(len(items), show_progress)
        for start, stop in _chunks(len(items), batch_size):
            ids = self.tokenizer.encode(items[start:stop], truncate=truncate, offset=start)
            # Longest first: the first batch shows at once whether memory suffices.
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
            for b in range(0, len(order), batch_size):
                rows = order[b : b + batch_size]
                input_ids, mask = self.tokenizer.pad([ids[i] for i in rows])
                (vectors,) = self.runner.run(input_ids, mask)
                out[[start + i for i in rows]] = vectors
                if progress is not None:
                    progress.update(len(rows))
        if progress is not None:
            progress.close()
        return normalize_rows(out) if normalize else out


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
