"""Fused DeBERTa attention: each layer's attention exported as one ONNX Runtime ``MultiHeadAttention`` node.

DeBERTa's attention sums three score matrices (content-to-content ``q . k``, content-to-position and
position-to-content), then takes a softmax and multiplies with V. With ``folded_relative_attention`` the two
position terms come out of ``_optimize._bias`` as one ``[batch, heads, seq, seq]`` tensor, already scaled; this
module hands it to ONNX Runtime's ``com.microsoft.MultiHeadAttention`` contrib operator as its additive
``attention_bias``, with the padding as its ``key_padding_mask``, so that one kernel computes ``q . k``, adds
the bias and the mask, takes the softmax and multiplies with V.

How it is exported: within ``fused_attention``, each layer's ``DisentangledSelfAttention.forward`` calls the
custom op ``deberta_onnx::disentangled_attention`` (an eager implementation with ONNX Runtime's semantics, so
the rewritten model still runs in PyTorch), and the dynamo exporter translates that op into the contrib node
(``TRANSLATIONS``, passed as its ``custom_translation_table``). The export validates the result against the
unmodified PyTorch model, like every graph.

What differs from transformers, and why it does not matter:

- transformers masks a padded *query* row entirely as well (its mask is the outer product of the padding);
  the kernel masks keys only. A padded row's hidden state then differs, but no valid token reads it (padded
  keys are masked in every layer) and the pooling and the validation ignore padded positions.
- Masked keys get ``MASK_FILTER_VALUE`` (-10000, ONNX Runtime's default) added instead of being replaced by
  float32's lowest value; after the softmax their weight is ``exp(-10000)``, zero in float32 and fp16 alike,
  and a row whose keys are all padding stays finite.

What the CPU kernel does (onnxruntime ``contrib_ops/cpu/bert``): with an attention bias it cannot take its
flash path, so it still writes one ``[batch, heads, seq, seq]`` probability buffer per layer (the bias input
is a second one); it saves the separate score, sum, mask and softmax tensors of the unfused graph. On CUDA, the
memory-efficient kernel accepts such a bias when the sequence is a multiple of 8 (fp16) or 16 (fp32).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._optimize import relative_attention_layers

__all__ = ["MASK_FILTER_VALUE", "TRANSLATIONS", "disentangled_attention", "fused_attention"]

# Added to the scores of padded keys: ONNX Runtime's default ``mask_filter_value``, finite in fp16 too.
MASK_FILTER_VALUE = -10000.0


@torch.library.custom_op("deberta_onnx::disentangled_attention", mutates_args=())
def disentangled_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
                           bias: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """``softmax(scale * q . k + bias + mask) . v`` per head, with ``MultiHeadAttention``'s layout: ``query``,
    ``key`` and ``value`` are ``[batch, seq, hidden]``, ``key_mask`` ``[batch, seq]`` (1 for a token, 0 for
    padding), ``bias`` ``[batch, heads, seq, seq]``; returns ``[batch, seq, hidden]``."""
    batch, size, _ = query.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, x.shape[1], num_heads, -1).transpose(1, 2)

    scores = torch.matmul(heads(query), heads(key).transpose(-1, -2)) * scale + bias
    padding = torch.where(key_mask[:, None, None, :] > 0, 0.0, MASK_FILTER_VALUE).to(scores.dtype)
    context = torch.matmul(torch.softmax(scores + padding, dim=-1), heads(value))
    return context.transpose(1, 2).reshape(batch, size, -1)


@disentangled_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor, bias: torch.Tensor,
      num_heads: int, scale: float) -> torch.Tensor:
    return query.new_empty((query.shape[0], query.shape[1], value.shape[2]))


def _multi_head_attention() -> Any:
    """The contrib operator as an onnxscript op. ONNX's own registry does not know ONNX Runtime's contrib
    schemas, so the inputs used here are declared by hand (names and order as in ONNX Runtime's
    ``docs/ContribOperators.md``)."""
    import onnxscript
    from onnx.defs import OpSchema

    parameter, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[parameter("query", "T"), parameter("key", "T", param_option=optional),
                parameter("value", "T", param_option=optional), parameter("bias", "T", param_option=optional),
                parameter("key_padding_mask", "M", param_option=optional),
                parameter("attention_bias", "T", param_option=optional)],
        outputs=[parameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
                    OpSchema.Attribute("mask_filter_value", OpSchema.AttrType.FLOAT, "", required=False)],
    )
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)


def _translate(query: Any, key: Any, value: Any, key_mask: Any, bias: Any, num_heads: int, scale: float) -> Any:
    from onnx import TensorProto
    from onnxscript import opset18 as op

    mask = op.Cast(key_mask, to=TensorProto.INT32)
    return _multi_head_attention()(query, key, value, None, mask, bias, num_heads=num_heads, scale=scale,
                                   mask_filter_value=MASK_FILTER_VALUE)


# The dynamo exporter's ``custom_translation_table`` for graphs exported within ``fused_attention``.
TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.deberta_onnx.disentangled_attention.default: _translate,
}


def _forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False,
             query_states: torch.Tensor | None = None, relative_pos: Any = None, rel_embeddings: Any = None
             ) -> tuple[torch.Tensor, None]:
    """Drop-in for ``DisentangledSelfAttention.forward`` (self-attention), with the 2-D padding mask that the
    patched encoder passes instead of transformers' ``[batch, 1, seq, seq]`` one."""
    if query_states is None:
        query_states = hidden_states
    heads = self.num_attention_heads
    query, key = self.query_proj(query_states), self.key_proj(hidden_states)
    value = self.value_proj(hidden_states)
    query_layer = self.transpose_for_scores(query, heads)  # [batch * heads, seq, head_size]
    key_layer = self.transpose_for_scores(key, heads)
    factor = 1 + len(set(self.pos_att_type))
    bias = self.disentangled_attention_bias(query_layer, key_layer, relative_pos, rel_embeddings, factor)
    bias = bias.reshape(query.shape[0], heads, query.shape[1], key.shape[1])
    scale = 1.0 / math.sqrt(query_layer.shape[-1] * factor)
    context = torch.ops.deberta_onnx.disentangled_attention(query, key, value, attention_mask, bias, heads, scale)
    return context, None


def _padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's mask hook, fused: the layers take the ``[batch, seq]`` padding mask as it is."""
    if attention_mask.dim() != 2:
        raise ValueError("fused attention takes a [batch, sequence] padding mask")
    return attention_mask


@contextmanager
def fused_attention(model: torch.nn.Module) -> Iterator[int]:
    """Within the block (itself inside ``folded_relative_attention``, whose position bias it uses), the model's
    DeBERTa-v2/v3 attention layers call ``disentangled_attention``; export with ``TRANSLATIONS``. On exit the
    model is restored exactly. Yields how many layers were rewritten: 0 when the folding did not cover the model
    (DeBERTa v1, no relative attention), which then exports unfused."""
    layers = [layer for layer in relative_attention_layers(model) if "disentangled_attention_bias" in vars(layer)]
    encoders: list[Any] = [m for m in model.modules() if type(m).__name__ == "DebertaV2Encoder"]
    if not layers or len(encoders) != 1:
        yield 0
        return
    try:
        encoders[0].get_attention_mask = _padding_mask
        for layer in layers:
            layer.forward = types.MethodType(_forward, layer)
        yield len(layers)
    finally:
        encoders[0].__dict__.pop("get_attention_mask", None)
        for layer in layers:
            layer.__dict__.pop("forward", None)
