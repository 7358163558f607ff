"""Finding and loading a DeBERTa checkpoint, and building random-weight ones of the published shapes."""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from deberta_onnx.runtime.contract import (
    TASK_EMBEDDING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
    TASKS,
)

from ._errors import CheckpointError, UnsupportedModelError

__all__ = ["RANDOM_SHAPES", "LoadedCheckpoint", "build_random_checkpoint", "load_checkpoint", "train_sentencepiece"]

# model_type -> the architectures it covers. DeBERTa-v3 checkpoints are "deberta-v2" models.
SUPPORTED_MODEL_TYPES = {"deberta-v2": "DebertaV2Model (DeBERTa-v2, DeBERTa-v3)", "deberta": "DebertaModel (DeBERTa v1)"}

RANDOM_PREFIX = "random:"

# Task -> (transformers loader, the architecture suffix a checkpoint with that head declares).
_TASK_LOADERS: dict[str, tuple[Any, str]] = {
    TASK_EMBEDDING: (AutoModel, ""),
    TASK_SEQUENCE_CLASSIFICATION: (AutoModelForSequenceClassification, "ForSequenceClassification"),
    TASK_TOKEN_CLASSIFICATION: (AutoModelForTokenClassification, "ForTokenClassification"),
}

_V3_COMMON: dict[str, Any] = {
    "vocab_size": 128100,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "max_relative_positions": -1,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "type_vocab_size": 0,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-7,
    "pad_token_id": 0,
}

# The published DeBERTa-v3 shapes (parameter counts include the 128k-token embedding table).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "deberta-v3-xsmall": {**_V3_COMMON, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                          "intermediate_size": 1536},
    "deberta-v3-small": {**_V3_COMMON, "hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
                         "intermediate_size": 3072},
    "deberta-v3-base": {**_V3_COMMON, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072},
    "deberta-v3-large": {**_V3_COMMON, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                         "intermediate_size": 4096},
}

# Special pieces in DeBERTa-v3's SentencePiece model, at these ids.
_SPECIAL_PIECES = {"pad": "[PAD]", "bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]"}


@dataclass
class LoadedCheckpoint:
    """A loaded source: the PyTorch encoder, its config and fast tokenizer, and where it came from."""

    model: PreTrainedModel
    config: PretrainedConfig
    tokenizer: Any
    path: str
    source: dict[str, Any] = field(default_factory=dict)
    task: str = TASK_EMBEDDING


def sentences() -> list[str]:
    """The sentences shipped with the package (``export/data/sentences.txt``), one per line."""
    path = Path(__file__).with_name("data") / "sentences.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 2000, seed: int = 0) -> Path:
    """Trains a DeBERTa-v3-style SentencePiece unigram model and writes ``out_dir/spm.model``.

    Pieces ``[PAD]``=0, ``[CLS]``=1, ``[SEP]``=2, ``[UNK]``=3, then ``[MASK]``; byte fallback on, as in
    DeBERTa-v3. ``vocab_size`` is an upper bound: a small corpus yields fewer pieces.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = list(texts)
    random.Random(seed).shuffle(lines)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "spm"),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0, pad_piece=_SPECIAL_PIECES["pad"],
        bos_id=1, bos_piece=_SPECIAL_PIECES["bos"],
        eos_id=2, eos_piece=_SPECIAL_PIECES["eos"],
        unk_id=3, unk_piece=_SPECIAL_PIECES["unk"],
        user_defined_symbols=["[MASK]"],
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    (out / "spm.vocab").unlink(missing_ok=True)
    return out / "spm.model"


def build_random_checkpoint(
    shape: str | dict[str, Any],
    out_dir: str | Path,
    *,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2000,
) -> Path:
    """Writes a Hugging Face DeBERTa-v2 checkpoint with **random weights** to ``out_dir``.

    For parity tests and latency benchmarks, where the weights' values do not matter. The config carries
    ``deberta_onnx_random_weights: true`` so every later stage can label it as such.

    Args:
        shape: a name from ``RANDOM_SHAPES`` (e.g. ``"deberta-v3-base"``) or ``DebertaV2Config`` keyword arguments.
        out_dir: folder to write (``config.json``, ``model.safetensors``, ``spm.model``, ``tokenizer_config.json``).
        seed: seeds the weights and the tokenizer's training.
        texts: corpus for the SentencePiece tokenizer; default the sentences shipped with the package.
        vocab_size: upper bound on the tokenizer's pieces (never more than the model's embedding rows).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import DebertaV2Config, DebertaV2Model

    if isinstance(shape, str):
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
        name, kwargs = shape, RANDOM_SHAPES[shape]
    else:
        name, kwargs = "custom", dict(shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = DebertaV2Config(**kwargs)
    config.deberta_onnx_random_weights = True
    config.deberta_onnx_shape = name
    torch.manual_seed(seed)
    model = DebertaV2Model(config).eval()
    model.save_pretrained(out)
    train_sentencepiece(texts if texts is not None else sentences(), out, vocab_size=min(vocab_size, config.vocab_size),
                        seed=seed)
    max_length = int(config.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "DebertaV2Tokenizer", "model_max_length": max_length, "do_lower_case": False,
                    "split_by_punct": False, "vocab_file": "spm.model"}, indent=2) + "\n",
        encoding="utf-8",
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                    "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]"}, indent=2) + "\n",
        encoding="utf-8",
    )
    return out


def _from_pretrained(loader: Any, src: str, **kwargs: Any) -> Any:
    """Loads from a local folder, else the Hugging Face cache, else the hub; one clear error if all fail."""
    if Path(src).is_dir():
        return loader.from_pretrained(src, **kwargs)
    try:
        return loader.from_pretrained(src, local_files_only=True, **kwargs)
    except OSError:
        pass
    try:
        return loader.from_pretrained(src, **kwargs)
    except OSError as exc:
        raise CheckpointError(
            f"cannot load checkpoint {src!r}: it is not a local folder, not in the Hugging Face cache, and the "
            f"hub could not be reached or has no such model ({exc.__class__.__name__}). Pass a local checkpoint "
            "folder, download the model on a machine with access first, or use `random:deberta-v3-base` for a "
            "random-weight checkpoint."
        ) from exc


def checkpoint_task(config: PretrainedConfig) -> str:
    """The task a checkpoint's head is for, from its ``architectures``: a sequence or token classifier, else
    ``embedding`` (the encoder alone)."""
    for architecture in config.architectures or []:
        for task, (_, suffix) in _TASK_LOADERS.items():
            if suffix and architecture.endswith(suffix):
                return task
    return TASK_EMBEDDING


def load_checkpoint(src: str, task: str | None = None) -> LoadedCheckpoint:
    """Loads ``src`` (a local folder or a hub id) with its fast tokenizer: the encoder alone for ``embedding``,
    encoder and head for the classification tasks. ``task=None`` follows the checkpoint's architecture.

    Raises:
        CheckpointError: not found, unreadable, or without a tokenizer.
        UnsupportedModelError: not a DeBERTa architecture (the message lists the supported ones), or a
            classification task asked of a checkpoint without that head.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    path = Path(src)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{src} is a file; pass the checkpoint's folder (the one with config.json).")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; it is not a Hugging Face checkpoint folder.")
    config = _from_pretrained(AutoConfig, src)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"{key}: {value}" for key, value in SUPPORTED_MODEL_TYPES.items())
        raise UnsupportedModelError(
            f"{src} is a {config.model_type!r} model ({', '.join(config.architectures or []) or 'no architecture'}"
            f"); deberta-onnx exports only DeBERTa encoders ({supported})."
        )
    own_task = checkpoint_task(config)
    task = task or own_task
    if task != TASK_EMBEDDING and task != own_task:
        raise UnsupportedModelError(
            f"{src} has no {task} head (architectures: {', '.join(config.architectures or []) or 'none'}); "
            f"exporting it as {task} would add an untrained, random head. Export a checkpoint fine-tuned for "
            f"{task}, or leave --task unset."
        )
    try:
        tokenizer = _from_pretrained(AutoTokenizer, src)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{src}: its tokenizer cannot be loaded ({exc}).") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{src}: transformers gave no fast tokenizer, so no tokenizer.json can be written.")
    model = _from_pretrained(_TASK_LOADERS[task][0], src).eval()
    source = {
        "model": str(src),
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "random_weights": bool(getattr(config, "deberta_onnx_random_weights", False)),
        "shape": getattr(config, "deberta_onnx_shape", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return LoadedCheckpoint(model=model, config=config, tokenizer=tokenizer, path=str(src), source=source, task=task)


def random_source(src: str, workdir: str | Path) -> str:
    """For ``random:SHAPE`` sources, builds the checkpoint under ``workdir`` and returns its path."""
    shape = src[len(RANDOM_PREFIX):]
    if shape not in RANDOM_SHAPES:
        raise CheckpointError(f"unknown random shape {shape!r}; choose one of: {', '.join(RANDOM_SHAPES)}")
    return str(build_random_checkpoint(shape, Path(workdir) / shape))


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="deberta-onnx-")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silences transformers' and torch.onnx's progress bars and warnings for the duration; restores them after.

    The export prints its own progress; theirs (weight loading bars, "torchvision is not installed") is noise.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
