"""Recipes: the ways to build each lower precision, from the most compact to the safest."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_FP16_RECIPE", "RECIPES", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    """One way to build a precision. A precision's recipes run from the most compact to the safest; the
    quality gate's search tries them in that order.

    Attributes:
        precision: the variant it builds (``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``).
        name: short name recorded in the manifest.
        description: what stays in which precision, for the manifest and the terminal.
        fp16_elementwise: fp16: run elementwise ops (bias and residual adds, GELU, scaling) in fp16 too.
        fp16_normalization: fp16: run LayerNorm, the fused residual add + LayerNorm and softmax in fp16 too
            (ONNX Runtime's CUDA kernels take them in fp16, LayerNorm and softmax accumulating in fp32, and its own
            fp16 conversion of BERT-like models leaves them in fp16: no cast around them).
        fp16_range_audit: fp16: keep in fp32 what the range audit finds near fp16's range on the calibration
            texts (``_range_audit``).
        split_outliers: int8: compute in fp32 the input channels that the calibration texts show far above the
            rest of their tensor (a trained encoder's outlier dimensions), beside the int8 MatMul.
        mixed: int8: also keep in fp32 the weight MatMuls whose int8 error on the calibration texts is largest,
            as few as pass the quality gate there (``_sensitivity``).
    """

    precision: str
    name: str
    description: str
    fp16_elementwise: bool = True
    fp16_normalization: bool = False
    fp16_range_audit: bool = True
    split_outliers: bool = True
    mixed: bool = False


_INT8_RECIPES: tuple[tuple[str, str, dict[str, bool]], ...] = (
    ("all", "every weight MatMul and the word embeddings (one scale per row) in int8; input channels far above "
            "the rest of their tensor on the calibration texts (outlier dimensions) in fp32 beside them", {}),
    ("mixed", "as 'all', and the weight MatMuls with the largest int8 error on the calibration texts in fp32, as "
              "few as pass the quality gate there", {"mixed": True}),
)

RECIPES: dict[str, tuple[Recipe, ...]] = {
    "fp16": (
        Recipe("fp16", "cuda", "fp16 weights and activations, LayerNorm, the residual adds and softmax included (as "
                               "ONNX Runtime's CUDA kernels run them); relative-position indices, reductions and "
                               "pooling (and what the range audit finds near fp16's range) in fp32; fp32 inputs and "
                               "output", fp16_normalization=True),
        Recipe("fp16", "standard", "fp16 weights and activations; LayerNorm, softmax, reductions, relative-position "
                                   "indices, pooling and what the range audit finds near fp16's range in fp32; "
                                   "fp32 inputs and output"),
        Recipe("fp16", "elementwise-fp32", "fp16 weights, MatMuls and embeddings; every other op in fp32 (and what "
                                           "the range audit finds near fp16's range)",
               fp16_elementwise=False),
    ),
    # fp16 starts from "standard" unless asked otherwise (ExportConfig.fp16_recipe); "cuda" has not been measured on
    # a GPU yet.
    "int8-dynamic": tuple(Recipe("int8-dynamic", name, text, **kw) for name, text, kw in _INT8_RECIPES),
    "int8-static": tuple(Recipe("int8-static", name, text, **kw) for name, text, kw in _INT8_RECIPES),
}

DEFAULT_FP16_RECIPE = "standard"
