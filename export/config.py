"""The options of ``export_model`` (``ExportConfig``) and what it returns (``ExportResult``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.checks import check_positive_int
from deberta_onnx.runtime.contract import OPSET, POOLINGS, PRECISIONS, TASKS

from ._tokenizer import TOKENIZER_SOURCES
from ._triton import triton_name
from ._validate import DEFAULT_VALIDATION_SHAPES
from .precision import DEFAULT_FP16_RECIPE, RECIPES

__all__ = ["ATTENTION_MODES", "LONGEST_RELATIVE_LENGTH", "ExportConfig", "ExportResult"]

# ``ExportConfig.attention``: one ONNX Runtime kernel per layer (falling back to the unfused graph should it
# fail validation), or the unfused graph alone.
ATTENTION_MODES = ("fused", "unfused")
# The longest ``max_length`` for checkpoints with relative positions only (DeBERTa-v3): their log-bucketed
# relative distances have no table to run past, so inputs longer than ``max_position_embeddings`` are defined;
# this bounds the lengths the export validates and the runtime is measured at.
LONGEST_RELATIVE_LENGTH = 2048


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Options of ``export_model``; ``deberta-onnx export`` flags map one-to-one onto these fields.

    Attributes:
        overwrite: replace a non-empty OUT_DIR (the old folder is swapped out only once the new one is complete).
        pooling: how token vectors become one sentence vector, fused in the graph: ``"mean"`` (masked mean),
            ``"cls"`` (the first token's vector) or ``"max"`` (masked per-dimension maximum). ``None`` (default):
            a sentence-transformers checkpoint's own Pooling module, else ``"mean"``.
        normalize: L2-normalise the sentence vector inside the graph. ``None`` (default): whether a
            sentence-transformers checkpoint has a Normalize module, else no.
        token_embeddings: add a second output, ``token_embeddings`` ``[batch, sequence, hidden]`` (the last
            hidden state; large, so off by default).
        task: ``"embedding"`` (the encoder and pooling), ``"sequence-classification"``,
            ``"token-classification"``, ``"multiple-choice"`` or ``"fill-mask"`` (encoder and the checkpoint's
            head, output ``logits``; fill-mask only where the checkpoint holds trained MLM head weights). ``None``
            (default): what the checkpoint's architecture is (a ``...ForSequenceClassification`` checkpoint
            exports its head); ``"embedding"`` exports only the encoder of any checkpoint.
        max_length: longest input in tokens; default a sentence-transformers checkpoint's ``max_seq_length``,
            else the tokenizer's ``model_max_length``, capped at the model's ``max_position_embeddings``. Up to
            ``LONGEST_RELATIVE_LENGTH`` (2048) for checkpoints without absolute position embeddings (DeBERTa-v3),
            whose relative positions carry on past ``max_position_embeddings`` (distances beyond the last
            bucket share it, as in transformers); such exports are validated at those lengths too.
        validate: compare ONNX Runtime with PyTorch after export, and run the precisions' quality gate
            (strongly recommended).
        validation_shapes: (batch, sequence) pairs to validate on.
        atol: validation: the absolute part of the allowed |diff| between ONNX Runtime and PyTorch.
        rtol: validation: the relative part, a fraction of each output row's largest |value|: an element may
            differ by ``atol + rtol * max|row|`` (fp32 rounding grows with the values a row is computed from,
            so a model with large activations passes on its merits; a wrong graph still fails).
        tokenizer: where ``tokenizer.json`` comes from: ``"sentencepiece"`` (the checkpoint's ``spm.model``, ids
            identical to SentencePiece's; the default) or ``"transformers"`` (the installed transformers' fast
            tokenizer, for byte-exact agreement with an existing transformers pipeline).
        triton: also write a Triton Inference Server model repository, ``OUT_DIR/triton/<name>/`` (config.pbtxt
            with dynamic batching, the ONNX model under version 1); the tokenizer stays on the client.
        triton_name: its model name; default OUT_DIR's name.
        triton_max_batch_size: Triton's ``max_batch_size``: the largest batch its dynamic batcher forms.
        triton_max_queue_delay_us: how long Triton may hold a request to batch it with others.
        opset: ONNX opset of the graph.
        optimize: apply DeBERTa-specific graph speed-ups (see ``export/_optimize.py``): relative-position
            projections folded into per-layer constants, no per-batch repeat, position bias computed only for
            the distances a sequence can use. Recorded in the manifest; validated like the plain graph.
        portable: standard ONNX operators only (the ``ai.onnx`` domain): the DeBERTa-specific rewrites of
            ``optimize`` are kept, ONNX Runtime's transformer fusions (its ``com.microsoft`` contrib operators
            ``SkipLayerNormalization``, ``BiasGelu``, ...) are left out, so that engines other than ONNX Runtime
            (onnxruntime-web's WebGPU backend, OpenVINO, TensorRT's ONNX parser, ``onnx.reference``) take every
            variant. ONNX Runtime runs it a little slower on the CPU (measured: README, "Runtimes and engines").
            Recorded in the manifest (``optimization.portable``); not with ``attention="fused"``.
        attention: ``"unfused"`` (the default): the scores, mask and softmax as separate operators, the graph
            the CPU runs fastest (measured: ``benchmarks/README.md``, "Long inputs"). ``"fused"`` (with
            ``optimize``): each layer's attention is one ONNX Runtime
            ``MultiHeadAttention`` kernel, with the relative-position scores as its additive bias (see
            ``export/_attention.py``); should that graph fail validation, the unfused one is exported instead,
            and the manifest says so.
        seed: seeds the validation inputs.
        quiet: no progress bars or report on stderr.
        precisions: the variants to write (``"fp32"``, ``"fp16"``, ``"int8-dynamic"``, ``"int8-static"``); fp32
            is always written, first, as the reference the others are derived from and compared with.
        calibration: int8-static: a UTF-8 text file, one sentence per line, whose activation ranges fix the
            quantization scales; default the 300 shipped sentences the quality gate does not hold out.
        min_cosine_fp16: the quality gate's threshold for fp16: lowest allowed cosine between a held-out
            sentence's vector and the fp32 PyTorch one.
        min_cosine_int8: the same for int8-dynamic and int8-static.
        fallback: when a precision fails the gate, try its safer recipes in turn (and say so) instead of failing:
            int8 ``all`` -> ``mixed`` (the fewest weight MatMuls kept fp32 that pass), fp16 ``standard`` ->
            ``elementwise-fp32``. On by default, so nobody needs to know the recipes; ``False`` stops at the
            first.
        fp16_recipe: how fp16 is built (``RECIPES["fp16"]``): ``"standard"`` (LayerNorm, softmax and the fused
            residual add + LayerNorm in fp32), ``"cuda"`` (those in fp16 too, as ONNX Runtime's CUDA kernels run
            them; fewer casts) or ``"elementwise-fp32"``; ``fallback`` goes on to the safer ones after it.
    """

    overwrite: bool = False
    pooling: str | None = None
    normalize: bool | None = None
    token_embeddings: bool = False
    task: str | None = None
    max_length: int | None = None
    validate: bool = True
    validation_shapes: tuple[tuple[int, int], ...] = DEFAULT_VALIDATION_SHAPES
    atol: float = 1e-4
    rtol: float = 1e-5
    tokenizer: str = "sentencepiece"
    triton: bool = False
    triton_name: str | None = None
    triton_max_batch_size: int = 64
    triton_max_queue_delay_us: int = 1000
    opset: int = OPSET
    optimize: bool = True
    portable: bool = False
    attention: str = "unfused"
    seed: int = 0
    quiet: bool = False
    precisions: tuple[str, ...] = ("fp32",)
    calibration: str | None = None
    min_cosine_fp16: float = 0.999
    min_cosine_int8: float = 0.99
    fallback: bool = True
    fp16_recipe: str = DEFAULT_FP16_RECIPE

    def __post_init__(self) -> None:
        if isinstance(self.precisions, str) or not all(isinstance(p, str) for p in self.precisions):
            raise TypeError(
                f"precisions must be a tuple of names, e.g. ('fp32', 'int8-static'), got {self.precisions!r}"
            )
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
        # fp32 first (always written: the others are derived from it), then the rest in canonical order.
        object.__setattr__(self, "precisions", tuple(p for p in PRECISIONS if p == "fp32" or p in self.precisions))
        for name in ("min_cosine_fp16", "min_cosine_int8"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a cosine in (0, 1], got {value!r}")
        fp16_recipes = [recipe.name for recipe in RECIPES["fp16"]]
        if self.fp16_recipe not in fp16_recipes:
            raise ValueError(f"fp16_recipe must be one of {', '.join(fp16_recipes)}, got {self.fp16_recipe!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.triton_name is not None:
            triton_name(self.triton_name)
        check_positive_int("triton_max_batch_size", self.triton_max_batch_size)
        check_positive_int("triton_max_queue_delay_us", self.triton_max_queue_delay_us, minimum=0)
        # Two tokens at least: room for [CLS] and [SEP].
        check_positive_int("max_length", self.max_length, optional=True, minimum=2)
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.portable and self.attention == "fused":
            raise ValueError("portable=True (--portable) keeps to standard ONNX operators, and attention='fused' is "
                             "ONNX Runtime's MultiHeadAttention contrib operator; drop one of them (attention="
                             "'unfused' is the default and the CPU's fastest).")
        if self.tokenizer not in TOKENIZER_SOURCES:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZER_SOURCES)}, got {self.tokenizer!r}")
        if not self.atol > 0:
            raise ValueError(f"atol must be positive, got {self.atol!r}")
        if not self.rtol >= 0:
            raise ValueError(f"rtol must be 0 or more, got {self.rtol!r}")
        for pair in self.validation_shapes:
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"validation_shapes holds (batch, sequence) pairs of positive ints, got {pair!r}")


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` produced: the folder, its manifest, and the seconds it took."""

    out_dir: Path
    manifest: dict[str, Any]
    seconds: float
