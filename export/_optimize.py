"""DeBERTa-specific graph speed-ups applied at export.

``folded_relative_attention`` rewrites DeBERTa-v2/v3's disentangled attention bias for the export only:

- The relative-position projections (``query_proj``/``key_proj``, or ``pos_query_proj``/``pos_key_proj``, of
  the normalised relative embeddings) do not depend on the input: they are computed once, in fp32, scaled, and
  stored per layer as constants ``[heads, 2 * span, head_size]``. The graph no longer runs the relative
  embeddings' LayerNorm and 24 projections (ONNX Runtime folded them at every session load, on the CPU only).
- The per-batch ``repeat`` of those projections (a ``Tile`` copying ``batch x heads x 2 span x head_size``
  floats per layer and term) is gone: the constants broadcast over the batch in ``MatMul``.
- Only the relative positions a sequence of length ``S`` can use are projected: ``2 S`` rows instead of
  ``2 span`` (512 in DeBERTa-v3), gathered by the bucket of each relative distance. The bucket of a distance
  depends only on ``S``, so that index is a small ``[2 S]`` vector rather than DeBERTa's ``[B, H, S, S]`` one.
- The ``[S, S]`` scores are read out of the ``[S, 2 S]`` band with the "relative shift" reshape (flatten, slice,
  reshape) instead of ``GatherElements`` over an expanded index tensor.

The rewrite is exact up to float rounding; the export validates the rewritten graph against the unmodified
PyTorch model like any other.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deberta_onnx.runtime.loggers import quiet_loggers

__all__ = ["apply_ort_fusions", "folded_relative_attention", "relative_attention_layers"]

_TERMS = {"c2p", "p2c"}


def relative_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """DeBERTa-v2/v3 self-attention modules whose position bias this rewrite covers (DeBERTa v1 has another
    attention and is left alone)."""
    layers = []
    for module in model.modules():
        if type(module).__name__ != "DisentangledSelfAttention" or not getattr(module, "relative_attention", False):
            continue
        if hasattr(module, "disentangled_attention_bias") and set(getattr(module, "pos_att_type", ())) <= _TERMS:
            layers.append(module)
    return layers


def _encoder_of(model: torch.nn.Module) -> Any:
    for module in model.modules():
        if type(module).__name__ == "DebertaV2Encoder" and hasattr(module, "get_rel_embedding"):
            return module
    return None


def _bucket(relative: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log-bucketed relative position, on a vector of distances. The float32 expression is
    transformers' ``make_log_bucket_position`` term for term, so each distance lands in the same bucket."""
    if bucket_size <= 0 or max_position <= 0:
        return relative
    sign = torch.sign(relative)
    mid = bucket_size // 2
    abs_pos = torch.where((relative < mid) & (relative > -mid), torch.tensor(mid - 1).type_as(relative),
                          torch.abs(relative))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative.type_as(log_pos), log_pos * sign).to(torch.long)


def _shifted(band: torch.Tensor, size: Any) -> torch.Tensor:
    """``out[..., i, j] = band[..., i, j - i + size]`` for a band ``[..., size, 2 size]``: flatten each
    ``[size, 2 size]`` block, skip ``size`` entries, view as ``[size, 2 size - 1]`` and keep ``size`` columns."""
    lead = band.shape[:-2]
    flat = band.reshape(*lead, size * 2 * size)
    return flat[..., size: size + size * (2 * size - 1)].reshape(*lead, size, 2 * size - 1)[..., :size]


def _bias(self: Any, query_layer: torch.Tensor, key_layer: torch.Tensor, relative_pos: Any, rel_embeddings: Any,
          scale_factor: int) -> torch.Tensor:
    """Drop-in for ``DisentangledSelfAttention.disentangled_attention_bias`` (self-attention, query = key length).

    c2p[i, j] = q_i . K[span + bucket(i - j)] and p2c[i, j] = k_j . Q[span + bucket(i - j)] (DeBERTa's bucket is
    odd in the distance, which turns its transposed p2c gather into this form).
    """
    heads = self.num_attention_heads
    size = query_layer.shape[-2]
    device = query_layer.device
    # Column c of the band stands for the distance i - j = size - c (c2p) or c - size (p2c). Each distance vector
    # is one Range whose bounds are shape scalars: ONNX Runtime's CUDA provider reads Range's bounds on the host
    # and writes its output on the device. ``size - arange(2 * size)`` would instead subtract a host scalar from
    # a device tensor, a host-to-device copy in the graph that makes ONNX Runtime refuse CUDA graphs.
    span = self._deberta_onnx_span
    score = torch.zeros((), dtype=query_layer.dtype, device=device)
    if "c2p" in self.pos_att_type:
        distances = torch.arange(size, -size, -1, device=device)
        rows = torch.clamp(span + _bucket(distances, *self._deberta_onnx_buckets), 0, 2 * span - 1)
        keys = self._deberta_onnx_pos_key.index_select(1, rows).to(query_layer.dtype)  # [H, 2S, d]
        query = query_layer.reshape(-1, heads, size, query_layer.shape[-1])
        band = torch.matmul(query, keys.transpose(-1, -2))  # [B, H, S, 2S]
        score = score + _shifted(band, size).reshape(-1, size, size)
    if "p2c" in self.pos_att_type:
        distances = torch.arange(-size, size, device=device)
        rows = torch.clamp(span + _bucket(distances, *self._deberta_onnx_buckets), 0, 2 * span - 1)
        queries = self._deberta_onnx_pos_query.index_select(1, rows).to(key_layer.dtype)
        key = key_layer.reshape(-1, heads, size, key_layer.shape[-1])
        band = torch.matmul(key, queries.transpose(-1, -2))  # [B, H, S(j), 2S]
        score = score + _shifted(band, size).transpose(-1, -2).reshape(-1, size, size)
    return score


def _constants(module: Any, rel_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scaled relative-position projections of one layer, ``[heads, 2 span, head_size]`` each."""
    span = int(module.pos_ebd_size)
    rel = rel_embeddings[: span * 2].float()
    terms = len(set(module.pos_att_type)) + 1
    scale = math.sqrt(module.attention_head_size * terms)
    heads = module.num_attention_heads
    out = {}
    with torch.no_grad():
        for term, shared, own in (("c2p", "key_proj", "pos_key_proj"), ("p2c", "query_proj", "pos_query_proj")):
            if term not in module.pos_att_type:
                continue
            projection = getattr(module, shared if module.share_att_key else own)
            weight, bias = projection.weight.float(), projection.bias
            values = rel @ weight.T + (bias.float() if bias is not None else 0.0)
            out[term] = (values.reshape(span * 2, heads, -1).permute(1, 0, 2) / scale).contiguous()
    return out


@contextmanager
def folded_relative_attention(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the model's DeBERTa-v2/v3 attention layers use the folded position bias (see the
    module docstring); on exit they are restored exactly. Yields how many layers were rewritten (0 for models
    this rewrite does not cover, which then export as they are)."""
    encoder = _encoder_of(model)
    layers: list[Any] = relative_attention_layers(model) if encoder is not None else []
    if not layers:
        yield 0
        return
    with torch.no_grad():
        rel_embeddings = encoder.get_rel_embedding()
    buckets = (int(encoder.position_buckets), int(encoder.max_relative_positions))
    try:
        for module in layers:
            constants = _constants(module, rel_embeddings)
            module._deberta_onnx_span = int(module.pos_ebd_size)
            module._deberta_onnx_buckets = buckets
            if "c2p" in constants:
                module.register_buffer("_deberta_onnx_pos_key", constants["c2p"], persistent=False)
            if "p2c" in constants:
                module.register_buffer("_deberta_onnx_pos_query", constants["p2c"], persistent=False)
            module.disentangled_attention_bias = types.MethodType(_bias, module)
        yield len(layers)
    finally:
        for module in layers:
            for name in ("disentangled_attention_bias", "_deberta_onnx_span", "_deberta_onnx_buckets"):
                module.__dict__.pop(name, None)
            for name in ("_deberta_onnx_pos_key", "_deberta_onnx_pos_query"):
                module._buffers.pop(name, None)
                module._non_persistent_buffers_set.discard(name)


# Fusions from ONNX Runtime's transformer optimizer that match DeBERTa's graph. Its attention fusions look for
# BERT's attention and never match DeBERTa's disentangled one; they are left off so they cannot misfire.
_FUSIONS_OFF = ("attention", "embed_layer_norm", "rotary_embeddings", "group_norm", "bias_splitgelu", "packed_kv",
                "packed_qkv", "bias_add", "skip_group_norm", "qordered_matmul")


def apply_ort_fusions(path: Path, *, num_heads: int, hidden_size: int, external_data: bool) -> dict[str, int]:
    """Rewrites the ONNX file at ``path`` with ONNX Runtime's transformer fusions (``model_type="bert"``,
    python fusions only: the rest ONNX Runtime applies itself when it loads the graph).

    The fused graph uses ONNX Runtime's contrib operators (``com.microsoft`` ``BiasGelu``,
    ``SkipLayerNormalization``, ...): it runs on ONNX Runtime only, which is what this project targets.

    Returns:
        Fused operator counts, e.g. ``{"BiasGelu": 12, "SkipLayerNormalization": 24, ...}`` (zeros left out).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for name in _FUSIONS_OFF:
        attribute = f"enable_{name}"
        if hasattr(options, attribute):
            setattr(options, attribute, False)
    # Its shape inference warns about every symbolic Slice bound it cannot compare (the graph is validated anyway),
    # under two logger names: the optimizer imports that module both from the package and as a top-level module.
    with quiet_loggers("onnxruntime.transformers", "onnxruntime.tools.symbolic_shape_infer", "symbolic_shape_infer"):
        optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   optimization_options=options, opt_level=0)
        counts = {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}
        # The weights are in memory by now; the file is rewritten in place (inside the export's staging folder).
        optimized.save_model_to_file(str(path), use_external_data_format=external_data)
    return counts
