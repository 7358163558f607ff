"""Recipes: the ways to build each lower precision, from the most compact to the safest."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_FP16_RECIPE", "RECIPES", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    """One way to build a precision. A precision's recipes run from the most compact to the safest; the
    quality gate's fallback tries them in that order.

    Attributes:
        precision: the variant it builds (``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``).
        name: short name recorded in the manifest.
        description: what stays in which precision, for the manifest and the terminal.
        int8_embeddings: int8: store the word-embedding table in int8 (most of the file for DeBERTa-v3).
        int8_ffn_output: int8: quantize the feed-forward down-projections (where DeBERTa's activation
            outliers live).
        fp16_elementwise: fp16: run elementwise ops (bias and residual adds, GELU, scaling) in fp16 too.
        fp16_normalization: fp16: run LayerNorm, the fused residual add + LayerNorm and softmax in fp16 too
            (ONNX Runtime's CUDA kernels take them in fp16, LayerNorm and softmax accumulating in fp32, and its own
            fp16 conversion of BERT-like models leaves them in fp16: no cast around them).
    """

    precision: str
    name: str
    description: str
    int8_embeddings: bool = True
    int8_ffn_output: bool = True
    fp16_elementwise: bool = True
    fp16_normalization: bool = False


_INT8_RECIPES: tuple[tuple[str, str, dict[str, bool]], ...] = (
    ("all", "every weight MatMul and the word embeddings in int8", {}),
    ("embeddings-fp32", "weight MatMuls in int8, word embeddings in fp32", {"int8_embeddings": False}),
    ("ffn-output-fp32", "weight MatMuls in int8 except the feed-forward down-projections; embeddings in fp32",
     {"int8_embeddings": False, "int8_ffn_output": False}),
)

RECIPES: dict[str, tuple[Recipe, ...]] = {
    "fp16": (
        Recipe("fp16", "cuda", "fp16 weights and activations, LayerNorm, the residual adds and softmax included (as "
                               "ONNX Runtime's CUDA kernels run them); relative-position indices, reductions and "
                               "pooling in fp32; fp32 inputs and output", fp16_normalization=True),
        Recipe("fp16", "standard", "fp16 weights and activations; LayerNorm, softmax, reductions, relative-position "
                                   "indices and pooling in fp32; fp32 inputs and output"),
        Recipe("fp16", "elementwise-fp32", "fp16 weights, MatMuls and embeddings; every other op in fp32",
               fp16_elementwise=False),
    ),
    # fp16 starts from "standard" unless asked otherwise (ExportConfig.fp16_recipe); "cuda" has not been measured on
    # a GPU yet.
    "int8-dynamic": tuple(Recipe("int8-dynamic", name, text, **kw) for name, text, kw in _INT8_RECIPES),
    "int8-static": tuple(Recipe("int8-static", name, text, **kw) for name, text, kw in _INT8_RECIPES),
}

DEFAULT_FP16_RECIPE = "standard"
