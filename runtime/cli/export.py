"""``deberta-onnx export``: flags that map onto ``deberta_onnx.export.ExportConfig`` (needs the export extra).

Flags left unset are not passed, so ``ExportConfig`` alone decides their defaults; the help shows them when the
export extra is installed.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..contract import POOLINGS, PRECISIONS, TASKS
from .common import config_defaults, default_note

__all__ = ["add_parser", "run"]


def _defaults() -> dict[str, Any]:
    try:
        from deberta_onnx.export import ExportConfig
    except ImportError:
        return {}
    return config_defaults(ExportConfig)


def add_parser(commands: Any, *, with_defaults: bool) -> None:
    """Adds the ``export`` command; ``with_defaults`` reads the defaults shown in the help from ExportConfig
    (importing the export extra, so only when this command runs)."""
    d = _defaults() if with_defaults else {}
    unset = argparse.SUPPRESS
    parser = commands.add_parser(
        "export", help="export a checkpoint to a model folder (needs the export extra)",
        description="Export a Hugging Face DeBERTa checkpoint to OUT_DIR: model.onnx (encoder + pooling), "
                    "tokenizer.json and manifest.json, validated against PyTorch. SRC is a local checkpoint "
                    "folder, a hub id (offline when cached), or random:SHAPE for a checkpoint with random weights "
                    "(shapes: deberta-v3-xsmall, -small, -base, -large).",
    )
    add = parser.add_argument
    add("src", help="checkpoint folder, hub id, or random:deberta-v3-base")
    add("out_dir", help="model folder to write (built beside it, renamed into place at the end)")
    add("--overwrite", action="store_true", default=unset, help="replace OUT_DIR if it is not empty")
    add("--pooling", default=unset, choices=list(POOLINGS),
        help="pooling fused into the graph: masked mean of the token vectors, the [CLS] token's vector, or the "
             "masked per-dimension maximum (default: a sentence-transformers checkpoint's own, else mean)")
    add("--normalize", action="store_const", const=True, default=unset,
        help="L2-normalise the sentence vectors inside the graph (default: as a sentence-transformers "
             "checkpoint's Normalize module says, else off)")
    add("--token-embeddings", action="store_true", default=unset,
        help="add a second output, token_embeddings [batch, sequence, hidden], for Encoder.encode_tokens "
             "(large: off by default)")
    add("--task", default=unset, choices=list(TASKS),
        help="embedding (encoder + pooling), or a classifier's head with logits out (default: what the checkpoint "
             "is; --task embedding exports any checkpoint's encoder alone)")
    add("--max-length", type=int, default=unset,
        help="longest input in tokens (default: the model's; up to 2048 for DeBERTa-v3, whose positions are "
             "relative only)")
    add("--no-validate", dest="validate", action="store_false", default=unset,
        help="skip the comparison with PyTorch and the precisions' quality gate (not advised)")
    add("--atol", type=float, default=unset,
        help=f"validation: absolute part of the |diff| allowed against PyTorch{default_note(d, 'atol')}")
    add("--rtol", type=float, default=unset,
        help="validation: relative part, a fraction of each output row's largest |value| (an element may differ "
             f"by atol + rtol x max|row|){default_note(d, 'rtol')}")
    add("--tokenizer", default=unset, choices=["sentencepiece", "transformers"],
        help="tokenizer.json from the checkpoint's spm.model (ids as SentencePiece's) or from the installed "
             f"transformers' fast tokenizer{default_note(d, 'tokenizer')}")
    add("--no-optimize", dest="optimize", action="store_false", default=unset,
        help="export DeBERTa's attention as transformers writes it, without the graph speed-ups")
    add("--portable", action="store_true", default=unset,
        help="standard ONNX operators only: the DeBERTa speed-ups kept, ONNX Runtime's contrib-operator fusions "
             "left out, so that onnxruntime-web (WebGPU), OpenVINO, TensorRT and onnx.reference take every variant "
             "(a little slower on ONNX Runtime's CPU)")
    add("--attention", default=unset, choices=["fused", "unfused"],
        help="fused: one ONNX Runtime MultiHeadAttention kernel per layer, with the relative-position scores as "
             "its bias (the unfused graph is exported instead should it fail validation); unfused: scores, mask "
             f"and softmax as separate operators{default_note(d, 'attention')}")
    add("--triton", action="store_true", default=unset,
        help="also write a Triton Inference Server model repository to OUT_DIR/triton/NAME/ (config.pbtxt with "
             "dynamic batching, the model under version 1); clients tokenize with OUT_DIR/tokenizer.json")
    add("--triton-name", default=unset, help="the Triton model name (default: OUT_DIR's name)")
    add("--triton-max-batch-size", type=int, default=unset,
        help=f"largest batch Triton's dynamic batcher forms{default_note(d, 'triton_max_batch_size')}")
    add("--triton-max-queue-delay-us", type=int, default=unset,
        help="how long Triton may hold a request to batch it with others"
             f"{default_note(d, 'triton_max_queue_delay_us')}")
    add("--precision", dest="precisions", action="append", default=unset, metavar="NAMES",
        help=f"variants to write, comma-separated or repeated: {', '.join(PRECISIONS)} (default fp32; fp32 is "
             "always written, as the reference)")
    add("--calibration", default=unset, metavar="FILE",
        help="int8-static: text file, one sentence per line, that fixes the activation scales (default: the 300 "
             "shipped sentences the quality gate does not hold out)")
    add("--min-cosine-fp16", type=float, default=unset, metavar="COSINE",
        help="quality gate: lowest cosine to the fp32 PyTorch vector allowed for fp16"
             f"{default_note(d, 'min_cosine_fp16')}")
    add("--min-cosine-int8", type=float, default=unset, metavar="COSINE",
        help=f"quality gate: the same for int8-dynamic and int8-static{default_note(d, 'min_cosine_int8')}")
    add("--fallback", action="store_true", default=unset,
        help="when a precision fails the quality gate, try its safer recipes instead of failing (the default)")
    add("--no-fallback", dest="fallback", action="store_false", default=unset,
        help="fail as soon as a precision's first recipe fails the quality gate")
    add("--fp16-recipe", default=unset, choices=["cuda", "standard", "elementwise-fp32"],
        help="how fp16 is built: standard keeps LayerNorm and softmax in fp32; cuda runs them in fp16 as ONNX "
             f"Runtime's CUDA kernels do (fewer casts){default_note(d, 'fp16_recipe')}")
    add("--quiet", action="store_true", default=unset, help="no progress bars or report")
    parser.set_defaults(run=run)


def _precision_list(values: list[str]) -> tuple[str, ...]:
    """``--precision fp16,int8-static --precision int8-dynamic`` -> ("fp16", "int8-static", "int8-dynamic")."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return tuple(dict.fromkeys(names))


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``ExportConfig`` the flags stand for: only the flags given, the rest left to its defaults."""
    from deberta_onnx.export import ExportConfig

    given = {name: value for name, value in vars(args).items() if name not in ("src", "out_dir", "run", "command")}
    if "precisions" in given:
        given["precisions"] = _precision_list(given["precisions"])
    return ExportConfig(**given)


def run(args: argparse.Namespace) -> int:
    from deberta_onnx.export import export_model

    result = export_model(args.src, args.out_dir, config_from_args(args))
    print(result.out_dir)
    return 0
