"""The lower precisions (fp16, int8-dynamic, int8-static) derived from the exported fp32 graph under the quality
gate: the recipes, the ONNX graph surgery they share, activation statistics, the outlier split, the fp16 range
audit, the mixed recipe's sensitivity search, and the gate's measures.

``derive_variants`` is what ``export_model`` calls; the other names are the steps, for tests and benchmarks that
build one variant or check one step.
"""

from __future__ import annotations

from ._activations import ActivationStats, collect_activation_stats
from ._fp16 import build_fp16
from ._int8 import int8_units
from ._onnx_edit import fold_constants, prepare_base
from ._outlier_split import find_outlier_channels, split_outlier_channels
from ._quality import (
    GATED_TASKS,
    RANKED_DOCUMENTS,
    Readout,
    gate_items,
    gate_readout,
    held_out_set,
    measure,
    split_sentences,
)
from ._recipes import DEFAULT_FP16_RECIPE, RECIPES, Recipe  # first: config.py reads these
from ._variants import build_variant, derive_variants, read_calibration, recipe_chain

__all__ = [
    "DEFAULT_FP16_RECIPE",
    "GATED_TASKS",
    "RANKED_DOCUMENTS",
    "RECIPES",
    "ActivationStats",
    "Readout",
    "Recipe",
    "build_fp16",
    "build_variant",
    "collect_activation_stats",
    "derive_variants",
    "find_outlier_channels",
    "fold_constants",
    "gate_items",
    "gate_readout",
    "held_out_set",
    "int8_units",
    "measure",
    "prepare_base",
    "read_calibration",
    "recipe_chain",
    "split_outlier_channels",
    "split_sentences",
]
