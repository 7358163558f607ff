"""Activation outliers for random-weight checkpoints: the pattern trained BERT-family encoders have and random
weights lack, so that precision, tolerance and overflow work can be tested on it.

Trained encoders (DeBERTa-v3 among them) carry a few hidden dimensions whose values are hundreds to thousands
of times the median, through large LayerNorm gains and biases and large rows of the feed-forward
down-projection, and a few tokens ([SEP], punctuation) with very large embeddings. ``add_outliers`` builds that
into a ``DebertaV2Model`` so that the network still computes something input-dependent:

- Every LayerNorm of the encoder writes a large value into the outlier dimensions: the embeddings' and each
  layer's output LayerNorm a large bias (a near-constant offset), each attention-output LayerNorm a large bias
  and a large gain (values that vary from token to token). So the input of every query, key, value and
  feed-forward up-projection has a few channels ``scale`` times the median.
- The attention output's bias removes the offset from the residual stream again, and two feed-forward neurons
  per dimension take the rest out exactly (``GELU(x) - GELU(-x) = x``, through down-projection weights of +-1):
  the LayerNorm inputs stay ordinary, as in a trained model, and those neurons give the down-projection's input
  a few channels ``scale`` times the median too.
- The weights that read the outlier dimensions (query, key, value, up-projection) are scaled down by ``scale``,
  as trained models learn: otherwise the offsets swamp attention and every sentence gets the same vector.
- The embeddings of a few tokens are ``token_scale`` times larger (after the embedding LayerNorm they are
  ordinary again; they stretch the range of the embedding table).

With ``final=False`` (default) the encoder's last LayerNorm leaves the outlier dimensions ordinary, so the
sentence vectors are not dominated by a few near-constant dimensions (a quality gate on them would see nothing
else); ``final=True`` keeps them there too, for tolerance checks on large outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OutlierSpec", "add_outliers", "parse_outliers"]

# The median |value| of a standard normal: what a LayerNorm output's ordinary dimensions have.
_MEDIAN_NORMAL = 0.6745
_OUTLIER_OPTION = "outliers"


@dataclass(frozen=True, kw_only=True)
class OutlierSpec:
    """The activation outliers ``build_random_checkpoint(..., outliers=OutlierSpec(...))`` builds in.

    Attributes:
        scale: how large the outlier dimensions get, as a multiple of the median hidden value.
        dims: which hidden dimensions carry them; default ``count`` dimensions drawn from the seed.
        count: how many dimensions when ``dims`` is not given.
        tokens: tokenizer pieces whose embeddings are enlarged (those the tokenizer has), e.g. ``"[SEP]"``.
        token_scale: how much larger those embeddings are.
        final: keep the outliers in the encoder's last hidden state too (then a few near-constant
            dimensions dominate every sentence vector).
    """

    scale: float = 1500.0
    dims: tuple[int, ...] | None = None
    count: int = 3
    tokens: tuple[str, ...] = ("[CLS]", "[SEP]", ".", ",")
    token_scale: float = 20.0
    final: bool = False

    def __post_init__(self) -> None:
        for name in ("scale", "token_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
                raise ValueError(f"{name} must be a number >= 1, got {value!r}")
        if self.dims is not None:
            object.__setattr__(self, "dims", tuple(self.dims))
            if not self.dims or len(set(self.dims)) != len(self.dims) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.dims):
                raise ValueError(f"dims must be distinct hidden dimensions (ints >= 0), got {self.dims!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be a positive int, got {self.count!r}")
        if isinstance(self.tokens, str):
            raise TypeError(f"tokens must be a tuple of pieces, e.g. ('[SEP]', '.'), got {self.tokens!r}")
        object.__setattr__(self, "tokens", tuple(self.tokens))


def parse_outliers(option: str) -> OutlierSpec:
    """``outliers`` or ``outliers=SCALE`` (the ``random:SHAPE+...`` spelling) -> an ``OutlierSpec``.

    Raises:
        ValueError: anything else.
    """
    name, _, value = option.partition("=")
    if name != _OUTLIER_OPTION:
        raise ValueError(f"unknown random-checkpoint option {option!r}; the one option is '+outliers' or "
                         "'+outliers=SCALE' (e.g. random:deberta-v3-base+outliers=400)")
    if not value:
        return OutlierSpec()
    try:
        return OutlierSpec(scale=float(value))
    except ValueError as exc:
        raise ValueError(f"+outliers={value}: the scale must be a number >= 1 ({exc})") from exc


def add_outliers(model: torch.nn.Module, spec: OutlierSpec, spm_model: Path, *, seed: int = 0,
                 texts: Iterable[str] = ()) -> dict[str, Any]:
    """Builds ``spec``'s outliers into a ``DebertaV2Model`` in place (see the module docstring).

    Args:
        model: a freshly initialised ``DebertaV2Model``.
        spec: what to build.
        spm_model: the checkpoint's SentencePiece model, which names the enlarged tokens.
        seed: draws the dimensions and neurons when ``spec.dims`` is not given.
        texts: a few sentences on which the outliers' size is measured for the record.

    Returns:
        The record for the checkpoint's config (and from there the manifest): the spec, the dimensions and
        token ids used, and ``measured_ratio``, the largest |value| of an outlier dimension over the median
        |value|, in the LayerNorm outputs on ``texts``.
    """
    import sentencepiece as spm

    net: Any = model  # transformers' modules, typed loosely
    config: Any = net.config
    hidden, inner = int(config.hidden_size), int(config.intermediate_size)
    rng = np.random.default_rng(seed)
    dims = spec.dims if spec.dims is not None else tuple(sorted(int(d) for d in rng.choice(hidden, spec.count,
                                                                                          replace=False)))
    if max(dims) >= hidden:
        raise ValueError(f"outlier dims {dims} do not fit a hidden size of {hidden}")
    if inner < 2 * len(dims):
        raise ValueError(f"intermediate_size {inner} is too small for {len(dims)} outlier dims (needs 2 per dim)")
    neurons = [int(n) for n in rng.choice(inner, 2 * len(dims), replace=False)]
    pieces = spm.SentencePieceProcessor(model_file=str(spm_model))
    # A piece the tokenizer lacks maps to [UNK]; only [UNK] itself may stand for it.
    token_ids = sorted({pieces.piece_to_id(p) for p in spec.tokens
                        if pieces.piece_to_id(p) != pieces.unk_id() or p == pieces.id_to_piece(pieces.unk_id())})
    index = torch.tensor(dims)
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(dims))])
    offset = 0.9 * spec.scale * _MEDIAN_NORMAL  # the output LayerNorms' near-constant offset
    varying = 0.3 * spec.scale * _MEDIAN_NORMAL  # the attention LayerNorms' offset; their gain adds about as much
    layers = list(net.encoder.layer)
    with torch.no_grad():
        _layer_norm(net.embeddings.LayerNorm, index, 2.0, offset * sign)
        embeddings = net.embeddings.word_embeddings.weight
        embeddings[token_ids] *= spec.token_scale
        for number, layer in enumerate(layers):
            attention = layer.attention
            for projection in (attention.self.query_proj, attention.self.key_proj, attention.self.value_proj):
                projection.weight[:, index] /= spec.scale
            attention.output.dense.bias[index] = -offset * sign
            _layer_norm(attention.output.LayerNorm, index, varying / 3.0, varying * sign)
            up, down = layer.intermediate.dense, layer.output.dense
            up.weight[:, index] /= spec.scale
            for j, dim in enumerate(dims):
                for neuron, direction in ((neurons[2 * j], 1.0), (neurons[2 * j + 1], -1.0)):
                    up.weight[neuron] = 0.0
                    up.bias[neuron] = 0.0
                    up.weight[neuron, dim] = direction
                    down.weight[:, neuron] = 0.0
                    down.weight[dim, neuron] = -direction
            last = number == len(layers) - 1
            _layer_norm(layer.output.LayerNorm, index, 2.0, (offset if spec.final or not last else 0.0) * sign)
    record: dict[str, Any] = {**asdict(spec), "dims": list(dims), "token_ids": token_ids, "neurons": neurons}
    record["tokens"] = list(spec.tokens)
    record["measured_ratio"] = _measured_ratio(model, pieces, list(texts)[:16], index)
    return record


def _layer_norm(norm: Any, index: torch.Tensor, gain: float, bias: torch.Tensor | float) -> None:
    norm.weight[index] = gain
    norm.bias[index] = bias


def _measured_ratio(model: torch.nn.Module, pieces: Any, texts: list[str], index: torch.Tensor) -> float | None:
    """The largest |value| of the outlier dimensions over the median |value|, per LayerNorm output, at most."""
    if not texts:
        return None
    ratios: list[float] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        values = output.detach().abs()
        median = float(values.median())
        if median > 0:
            ratios.append(float(values[..., index].max()) / median)

    # Every LayerNorm but the relative-position embeddings' (encoder.LayerNorm), which reads no input.
    norms = [m for name, m in model.named_modules() if name.endswith("LayerNorm") and name != "encoder.LayerNorm"]
    handles = [norm.register_forward_hook(hook) for norm in norms]
    try:
        with torch.no_grad():
            for text in texts:
                ids = [pieces.bos_id(), *pieces.encode(text)[:126], pieces.eos_id()]
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return round(max(ratios), 1) if ratios else None
