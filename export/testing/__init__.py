"""What the tests and benchmarks build export runs from: random-weight checkpoints of the published DeBERTa-v3
shapes (with a SentencePiece tokenizer trained on the spot), activation outliers built into them, the shipped
sentences, and the export's internal steps that tests check one at a time (the torch modules and their trace,
the attention fusion, the validation batches).

    from deberta_onnx.export.testing import build_random_checkpoint
    checkpoint = build_random_checkpoint("deberta-v3-xsmall", "ckpt/xsmall")

``export_model`` takes ``random:SHAPE`` and ``random:SHAPE+outliers[=SCALE]`` sources through ``random_source``.
"""

from __future__ import annotations

from .._attention import TRANSLATIONS, fused_attention
from .._checkpoint import checkpoint_task, load_checkpoint
from .._optimize import folded_relative_attention, relative_attention_layers
from .._quiet import quiet_libraries
from .._sentences import shipped_sentences
from .._torch_graph import EmbeddingGraph, control_flow_nodes, export_onnx, masked_mean
from .._validate import make_batch, validate
from ._checkpoints import (
    RANDOM_PREFIX,
    RANDOM_SHAPES,
    add_head,
    add_question_answering_head,
    build_random_checkpoint,
    random_source,
    train_sentencepiece,
)
from ._outliers import OutlierSpec, add_outliers, parse_outliers

__all__ = [
    "RANDOM_PREFIX",
    "RANDOM_SHAPES",
    "TRANSLATIONS",
    "EmbeddingGraph",
    "OutlierSpec",
    "add_head",
    "add_outliers",
    "add_question_answering_head",
    "build_random_checkpoint",
    "checkpoint_task",
    "control_flow_nodes",
    "export_onnx",
    "folded_relative_attention",
    "fused_attention",
    "load_checkpoint",
    "make_batch",
    "masked_mean",
    "parse_outliers",
    "quiet_libraries",
    "random_source",
    "relative_attention_layers",
    "shipped_sentences",
    "train_sentencepiece",
    "validate",
]
