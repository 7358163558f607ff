"""Random-weight checkpoints of the published DeBERTa-v3 shapes, with a SentencePiece tokenizer trained on the
spot on the sentences shipped with the package: for parity tests and speed measurements, where the weights'
values do not matter."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .._errors import CheckpointError
from .._sentences import shipped_sentences
from .._tokenizer import sentencepiece_tokenizer
from ._outliers import OutlierSpec, add_outliers, parse_outliers

__all__ = [
    "RANDOM_PREFIX",
    "RANDOM_SHAPES",
    "add_head",
    "add_question_answering_head",
    "build_random_checkpoint",
    "random_source",
    "train_sentencepiece",
]

RANDOM_PREFIX = "random:"

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
    outliers: OutlierSpec | None = None,
) -> Path:
    """Writes a Hugging Face DeBERTa-v2 checkpoint with **random weights** to ``out_dir``.

    For parity tests and latency benchmarks, where the weights' values do not matter. The config carries
    ``deberta_onnx_random_weights: true`` so every later stage can label it as such.

    Args:
        shape: a name from ``RANDOM_SHAPES`` (e.g. ``"deberta-v3-base"``), optionally with ``+outliers`` or
            ``+outliers=SCALE`` (``OutlierSpec()`` or ``OutlierSpec(scale=SCALE)``), or ``DebertaV2Config``
            keyword arguments.
        out_dir: folder to write (``config.json``, ``model.safetensors``, ``spm.model``, ``tokenizer.json``,
            ``tokenizer_config.json``, ``special_tokens_map.json``).
        seed: seeds the weights and the tokenizer's training.
        texts: corpus for the SentencePiece tokenizer; default the sentences shipped with the package.
        vocab_size: upper bound on the tokenizer's pieces (never more than the model's embedding rows).
        outliers: build in the activation outliers of trained encoders (see ``OutlierSpec``); recorded as
            ``deberta_onnx_outliers`` in the config and from there in the manifest.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import DebertaV2Config, DebertaV2Model

    if isinstance(shape, str):
        shape, _, option = shape.partition("+")
        if option:
            if outliers is not None:
                raise ValueError(f"outliers given twice: in the shape ('+{option}') and as outliers={outliers!r}")
            outliers = parse_outliers(option)
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
    corpus = texts if texts is not None else shipped_sentences()
    spm_model = train_sentencepiece(corpus, out, vocab_size=min(vocab_size, config.vocab_size), seed=seed)
    if outliers is not None:
        # Saved again: the tokenizer, trained only now, names the tokens whose embeddings are enlarged.
        config.deberta_onnx_outliers = add_outliers(model, outliers, out / "spm.model", seed=seed,
                                                    texts=shipped_sentences()[1::25])
        model.save_pretrained(out)
    _write_tokenizer_files(out, spm_model, max_length=int(config.max_position_embeddings))
    return out


def _write_tokenizer_files(out: Path, spm_model: Path, *, max_length: int) -> None:
    """The tokenizer files that transformers (4.x and 5.x) and sentence-transformers load as they are.

    ``tokenizer.json`` is ``spm.model`` converted with its normaliser and byte fallback, declared as a plain
    ``PreTrainedTokenizerFast``: transformers 5's ``DebertaV2Tokenizer`` would rebuild it without them, and
    transformers 4's would need sentencepiece. So ``AutoTokenizer`` gives SentencePiece's ids on every version,
    without sentencepiece installed. ``spm.model`` stays for the export's own conversion and for the slow class.
    """
    from tokenizers import AddedToken

    specials = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]"}
    tokenizer = sentencepiece_tokenizer(spm_model)
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                  for piece in (*_SPECIAL_PIECES.values(), "[MASK]")])
    tokenizer.save(str(out / "tokenizer.json"))
    # No "vocab_file" entry: transformers 4.x reads it as a path relative to the working directory.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "model_input_names": ["input_ids", "token_type_ids", "attention_mask"], **specials}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def random_source(src: str, workdir: str | Path) -> str:
    """For ``random:SHAPE`` and ``random:SHAPE+outliers[=SCALE]`` sources, builds the checkpoint under
    ``workdir`` and returns its path."""
    shape, _, option = src[len(RANDOM_PREFIX):].partition("+")
    if shape not in RANDOM_SHAPES:
        raise CheckpointError(f"unknown random shape {shape!r}; choose one of: {', '.join(RANDOM_SHAPES)}")
    try:
        outliers = parse_outliers(option) if option else None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return str(build_random_checkpoint(shape, Path(workdir) / src[len(RANDOM_PREFIX):], outliers=outliers))


def add_question_answering_head(encoder_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """The checkpoint at ``encoder_dir`` (a ``DebertaV2Model``, e.g. from ``build_random_checkpoint``) under a
    ``DebertaV2ForQuestionAnswering`` head, saved to ``out_dir`` with the tokenizer files beside it (``add_head``).
    """
    return add_head(encoder_dir, out_dir, task="question-answering", seed=seed)


# transformers' class for each head ``add_head`` puts on an encoder.
_HEAD_CLASSES = {"question-answering": "DebertaV2ForQuestionAnswering",
                 "sequence-classification": "DebertaV2ForSequenceClassification",
                 "token-classification": "DebertaV2ForTokenClassification"}


def add_head(encoder_dir: str | Path, out_dir: str | Path, *, task: str, labels: Iterable[str] = (),
             seed: int = 0) -> Path:
    """The checkpoint at ``encoder_dir`` (a ``DebertaV2Model``, e.g. from ``build_random_checkpoint``, its weights
    kept as they are) under a question-answering, sequence-classification or token-classification head with
    ``labels`` (default transformers' two), saved to ``out_dir`` with the tokenizer files beside it.

    The head's weights are drawn at unit scale (std 0.3, zero biases): at transformers' initialisation (std 0.02)
    every logit is about 1e-3, every span or label about as likely as the next, which would test nothing.

    Raises:
        ValueError: another ``task``.
    """
    import transformers
    from transformers import AutoModel, DebertaV2Config

    if task not in _HEAD_CLASSES:
        raise ValueError(f"task must be one of {', '.join(_HEAD_CLASSES)}, got {task!r}")
    source, out = Path(encoder_dir), Path(out_dir)
    config = DebertaV2Config.from_pretrained(source)
    config.architectures = [_HEAD_CLASSES[task]]
    names = list(labels)
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    model = getattr(transformers, _HEAD_CLASSES[task])(config).eval()
    model.deberta.load_state_dict(AutoModel.from_pretrained(source).state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("deberta."):
                continue
            if name.endswith("weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            else:
                parameter.zero_()
    model.save_pretrained(out)
    for item in source.iterdir():
        if item.is_file() and item.name not in ("config.json", "model.safetensors", "pytorch_model.bin"):
            shutil.copy(item, out / item.name)
    return out
