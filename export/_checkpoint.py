"""Finding and loading a DeBERTa checkpoint (a local folder or a hub id) with its fast tokenizer."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from deberta_onnx.runtime.contract import (
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
    TASKS,
)

from ._errors import CheckpointError, UnsupportedHeadError, UnsupportedModelError
from ._heads import MaskedLMLoader

__all__ = ["SUPPORTED_MODEL_TYPES", "LoadedCheckpoint", "checkpoint_task", "load_checkpoint", "scratch_dir"]

# model_type -> the architectures it covers. DeBERTa-v3 checkpoints are "deberta-v2" models.
SUPPORTED_MODEL_TYPES = {"deberta-v2": "DebertaV2Model (DeBERTa-v2, DeBERTa-v3)",
                         "deberta": "DebertaModel (DeBERTa v1)"}

# The files a checkpoint's vocabulary comes in, one of which its folder must hold: the fast tokenizer, DeBERTa-v2/v3's
# SentencePiece model, DeBERTa v1's byte-level BPE vocabulary.
TOKENIZER_VOCABULARIES = ("tokenizer.json", "spm.model", "vocab.json")

# Task -> (transformers loader, the architecture suffix a checkpoint with that head declares).
_TASK_LOADERS: dict[str, tuple[Any, str]] = {
    TASK_EMBEDDING: (AutoModel, ""),
    TASK_SEQUENCE_CLASSIFICATION: (AutoModelForSequenceClassification, "ForSequenceClassification"),
    TASK_TOKEN_CLASSIFICATION: (AutoModelForTokenClassification, "ForTokenClassification"),
    TASK_MULTIPLE_CHOICE: (AutoModelForMultipleChoice, "ForMultipleChoice"),
    TASK_FILL_MASK: (MaskedLMLoader, "ForMaskedLM"),
    TASK_QUESTION_ANSWERING: (AutoModelForQuestionAnswering, "ForQuestionAnswering"),
}
# Heads a pre-trained encoder checkpoint may carry without naming them in ``architectures`` (DeBERTa v1/v2's MLM
# head): asked for with --task, they are loaded, and refused there if their weights are not in the checkpoint.
_UNDECLARED_HEADS = frozenset({TASK_FILL_MASK})
# The bare encoders' architecture names: no head, exported as ``embedding``.
_ENCODERS = frozenset({"DebertaV2Model", "DebertaModel"})


@dataclass
class LoadedCheckpoint:
    """A loaded source: the PyTorch encoder, its config and fast tokenizer, and where it came from."""

    model: PreTrainedModel
    config: PretrainedConfig
    tokenizer: Any
    path: str
    source: dict[str, Any] = field(default_factory=dict)
    task: str = TASK_EMBEDDING


def _from_pretrained(loader: Any, src: str, **kwargs: Any) -> Any:
    """Loads from a local folder, else the Hugging Face cache, else the hub; one clear error if all fail."""
    if Path(src).is_dir():
        return _loaded(loader, src, **kwargs)
    try:
        return _loaded(loader, src, local_files_only=True, **kwargs)
    except OSError:
        pass
    try:
        return _loaded(loader, src, **kwargs)
    except OSError as exc:
        raise CheckpointError(
            f"cannot load checkpoint {src!r}: it is not a local folder, not in the Hugging Face cache, and the "
            f"hub could not be reached or has no such model ({exc.__class__.__name__}). Pass a local checkpoint "
            "folder, download the model on a machine with access first, or use `random:deberta-v3-base` for a "
            "random-weight checkpoint."
        ) from exc


# What each loader reads, for the message when a file cannot be read.
_READS = {AutoConfig: "config.json", AutoTokenizer: "tokenizer files"}


def _loaded(loader: Any, src: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained``, whose failures on a damaged file (a truncated ``model.safetensors``, a
    ``config.json`` with a string where a number belongs) come as a ``CheckpointError`` naming the file and the
    cause: transformers, safetensors and huggingface_hub raise their own types for them."""
    try:
        return loader.from_pretrained(src, **kwargs)
    except (OSError, ImportError, CheckpointError):  # not found (the caller tries elsewhere), a missing package
        raise
    except Exception as exc:
        what = _READS.get(loader, "weights (model.safetensors or pytorch_model.bin)")
        cause = " ".join(str(exc).split())
        raise CheckpointError(
            f"cannot read the {what} of {src}: {type(exc).__name__}: {cause}. The checkpoint is damaged or "
            "incomplete (a truncated download, an edited file); copy or download it again."
        ) from exc


def checkpoint_task(config: PretrainedConfig, src: str = "the checkpoint") -> str:
    """The task a checkpoint's head is for, from its ``architectures``: a sequence or token classifier, an
    extractive question-answering head, a multiple-choice head, a masked-LM head (``fill-mask``), or
    ``embedding`` for the bare encoder (``DebertaV2Model``, ``DebertaModel``, or no ``architectures`` at all, as
    the released DeBERTa-v3 checkpoints have).

    Raises:
        UnsupportedHeadError: the checkpoint declares a head this exporter has no graph for (one transformers has
            no class for, or adds later); exporting it as an encoder would drop the head without a word.
    """
    unsupported = []
    for architecture in config.architectures or []:
        for task, (_, suffix) in _TASK_LOADERS.items():
            if suffix and architecture.endswith(suffix):
                return task
        if architecture not in _ENCODERS:
            unsupported.append(architecture)
    if unsupported:
        heads = ", ".join(f"{task}: ...{suffix}" for task, (_, suffix) in _TASK_LOADERS.items() if suffix)
        raise UnsupportedHeadError(
            f"{src} is a {' / '.join(unsupported)} checkpoint; deberta-onnx has no graph for that head (it exports "
            f"{heads}, and bare encoders), and exporting it as an encoder would silently drop the head you trained. "
            "Pass --task embedding (ExportConfig(task='embedding')) to keep only the encoder, for sentence vectors."
        )
    return TASK_EMBEDDING


def load_checkpoint(src: str, task: str | None = None) -> LoadedCheckpoint:
    """Loads ``src`` (a local folder or a hub id) with its fast tokenizer: the encoder alone for ``embedding``,
    encoder and head for the other tasks. ``task=None`` follows the checkpoint's architecture.

    Raises:
        CheckpointError: not found, unreadable, or without a tokenizer.
        UnsupportedModelError: not a DeBERTa architecture (the message lists the supported ones), or a
            classification task asked of a checkpoint without that head.
        UnsupportedHeadError: ``task=None`` and the checkpoint's head has no graph here (``checkpoint_task``).
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
    if task == TASK_EMBEDDING:
        own_task = TASK_EMBEDDING  # asked for: the encoder of any checkpoint, whatever head it has
    else:
        own_task = checkpoint_task(config, str(src))
    task = task or own_task
    undeclared = task in _UNDECLARED_HEADS and own_task == TASK_EMBEDDING
    if task != TASK_EMBEDDING and task != own_task and not undeclared:
        raise UnsupportedModelError(
            f"{src} has no {task} head (architectures: {', '.join(config.architectures or []) or 'none'}); "
            f"exporting it as {task} would add an untrained, random head. Export a checkpoint fine-tuned for "
            f"{task}, or leave --task unset."
        )
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_VOCABULARIES):
        raise CheckpointError(
            f"{src} has no tokenizer: none of {', '.join(TOKENIZER_VOCABULARIES)} is in it, and without one every "
            "word would become [UNK]. Copy the tokenizer files of the checkpoint this was trained from (spm.model "
            "or tokenizer.json, with tokenizer_config.json and special_tokens_map.json) into the folder; e.g. "
            "`AutoTokenizer.from_pretrained(BASE).save_pretrained(FOLDER)`."
        )
    tokenizer = _from_pretrained(AutoTokenizer, src)
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{src}: transformers gave no fast tokenizer, so no tokenizer.json can be written.")
    _check_vocabulary(tokenizer, src)
    model = _from_pretrained(_TASK_LOADERS[task][0], src).eval()
    source = {
        "model": str(src),
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "random_weights": bool(getattr(config, "deberta_onnx_random_weights", False)),
        "shape": getattr(config, "deberta_onnx_shape", None),
        "outliers": getattr(config, "deberta_onnx_outliers", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return LoadedCheckpoint(model=model, config=config, tokenizer=tokenizer, path=str(src), source=source, task=task)


def _check_vocabulary(tokenizer: Any, src: str) -> None:
    """Refuses a tokenizer that holds nothing but special tokens: what transformers builds when a checkpoint (in
    the hub cache, say) comes without its vocabulary, and which maps every word to [UNK]."""
    special = set(tokenizer.all_special_ids)
    if not set(tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).values()) - special:
        raise CheckpointError(
            f"{src}: its tokenizer holds only its {len(special)} special tokens: the vocabulary is missing, and "
            "every word would become [UNK]. Copy the tokenizer files of the checkpoint this was trained from "
            f"({', '.join(TOKENIZER_VOCABULARIES)}) into the folder."
        )


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for what the export builds on the way (random checkpoints, the folded graph)."""
    return tempfile.TemporaryDirectory(prefix="deberta-onnx-")
