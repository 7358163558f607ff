"""The multiple-choice and fill-mask graphs, and the masked-LM loader that refuses a checkpoint without a trained
MLM head.

Both graphs also say how to feed them from plain ``(input_ids, attention_mask)`` batches (``example_feed``): the
validation grid and the precisions' quality gate build their batches that way for every graph, and these two take
more than that (a choices axis; the masked positions).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoModelForMaskedLM

from deberta_onnx.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    MASK_POSITIONS,
    MASK_POSITIONS_INPUT,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TOKEN_TYPE_IDS,
    TensorSpec,
    choice_inputs,
    graph_inputs,
    graph_outputs,
)

from ._errors import UnsupportedHeadError

__all__ = ["EXAMPLE_CHOICES", "EXAMPLE_MASKS", "FillMaskGraph", "MaskedLMLoader", "MultipleChoiceGraph",
           "spread_choices", "spread_masks"]

# How many choices and masked positions ``example_feed`` makes of each row: more than one, so that the choices and
# masks axes are exercised (and, for the quality gate, each row of logits has a shape worth comparing).
EXAMPLE_CHOICES = 3
EXAMPLE_MASKS = 2

# The parameters of the two MLM head layouts transformers has (``config.legacy``: ``cls.predictions``; the original
# DeBERTa checkpoints' ``lm_predictions.lm_head``).
_HEAD_PREFIXES = ("cls.", "lm_predictions.")


def spread_choices(ids: np.ndarray, mask: np.ndarray, choices: int = EXAMPLE_CHOICES
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``[batch, choices, sequence]`` inputs from ``[batch, sequence]`` ones: choice ``j`` of a row keeps the first
    ``(j + 1) / choices`` of its tokens (at least one where the row has any), so that the choices of one question
    differ in length and padding, as real ones do."""
    lengths = mask.sum(axis=1)
    positions = np.arange(ids.shape[1])[None, :]
    all_ids, all_masks = [], []
    for j in range(choices):
        keep = np.where(lengths > 0, np.maximum(1, (lengths * (j + 1)) // choices), 0)
        choice_mask = (positions < keep[:, None]).astype(np.int64)
        all_ids.append(np.where(choice_mask > 0, ids, 0))
        all_masks.append(choice_mask)
    return np.stack(all_ids, axis=1), np.stack(all_masks, axis=1)


def spread_masks(mask: np.ndarray, masks: int = EXAMPLE_MASKS) -> np.ndarray:
    """``[batch, masks]`` positions spread over each row's tokens (position 0 for an all-padding row)."""
    lengths = mask.sum(axis=1)
    steps = (np.arange(masks) + 1)[None, :] / (masks + 1)
    return np.minimum((lengths[:, None] * steps).astype(np.int64), np.maximum(lengths[:, None] - 1, 0))


def _segments(mask: np.ndarray) -> np.ndarray:
    """Segment ids as for (prompt, choice) pairs: 1 from the middle of each row's tokens on."""
    lengths = mask.sum(axis=-1, keepdims=True)
    return ((np.arange(mask.shape[-1]) >= lengths // 2) & (mask > 0)).astype(np.int64)


class MultipleChoiceGraph(torch.nn.Module):
    """``(input_ids, attention_mask[, token_type_ids]) [batch, choices, sequence] -> logits [batch, choices]``: a
    transformers ``...ForMultipleChoice`` model (encoder, pooler, one-logit classifier) as one graph.

    Args:
        model: the ``DebertaV2ForMultipleChoice`` / ``DebertaForMultipleChoice`` model.
        token_type_ids: take segment ids (only for checkpoints with ``type_vocab_size > 0``).
    """

    task = TASK_MULTIPLE_CHOICE

    def __init__(self, model: torch.nn.Module, *, token_type_ids: bool = False) -> None:
        super().__init__()
        self.model = model
        self.token_type_ids = token_type_ids

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return choice_inputs(token_type_ids=self.token_type_ids)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return graph_outputs(TASK_MULTIPLE_CHOICE)

    def dummy_inputs(self) -> tuple[torch.Tensor, ...]:
        # 2 x 3 x 8: no axis 0 or 1 (torch.export would specialise on it), none equal to another.
        ids, mask = spread_choices(np.full((2, 8), 5, dtype=np.int64), np.ones((2, 8), dtype=np.int64))
        return tuple(torch.from_numpy(array) for array in self.example_feed(ids[:, 0], mask[:, 0]).values())

    def example_feed(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's feed from ``[batch, sequence]`` ids and mask (``spread_choices``)."""
        choice_ids, choice_mask = spread_choices(ids, mask)
        feed = {INPUT_IDS: choice_ids, ATTENTION_MASK: choice_mask}
        if self.token_type_ids:
            feed[TOKEN_TYPE_IDS] = _segments(choice_mask)
        return feed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


class FillMaskGraph(torch.nn.Module):
    """``(input_ids, attention_mask, mask_positions [batch, masks]) -> logits [batch, masks, vocab]``: the encoder,
    then the masked-LM head at the given positions only.

    The head is per token, so running it on the gathered positions gives exactly what the full model gives there,
    without the ``[batch, sequence, vocab]`` tensor (128k values per token for DeBERTa-v3's vocabulary) and without
    the vocabulary projection's work at every other position.

    Args:
        model: the ``DebertaV2ForMaskedLM`` / ``DebertaForMaskedLM`` model.
        mask_token_id: the ``[MASK]`` id, written into the example feeds at the positions they score.
    """

    task = TASK_FILL_MASK

    def __init__(self, model: torch.nn.Module, *, mask_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.mask_token_id = mask_token_id

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (*graph_inputs(), MASK_POSITIONS_INPUT)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return graph_outputs(TASK_FILL_MASK)

    def dummy_inputs(self) -> tuple[torch.Tensor, ...]:
        ids, mask = np.full((2, 8), 5, dtype=np.int64), np.ones((2, 8), dtype=np.int64)
        mask[1, 6:] = 0
        feed = self.example_feed(ids, mask, masks=3)
        return tuple(torch.from_numpy(array) for array in feed.values())

    def example_feed(self, ids: np.ndarray, mask: np.ndarray, masks: int = EXAMPLE_MASKS) -> dict[str, np.ndarray]:
        """The graph's feed from ``[batch, sequence]`` ids and mask: ``masks`` positions per row (``spread_masks``),
        each holding the ``[MASK]`` id where the row has tokens."""
        positions = spread_masks(mask, masks)
        masked = ids.copy()
        rows = np.arange(len(ids))[:, None]
        masked[rows, positions] = np.where(mask[rows, positions] > 0, self.mask_token_id, masked[rows, positions])
        return {INPUT_IDS: masked, ATTENTION_MASK: mask, MASK_POSITIONS: positions}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor
                ) -> torch.Tensor:
        model: Any = self.model
        hidden = model.deberta(input_ids=input_ids, attention_mask=attention_mask)[0]
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = torch.gather(hidden, 1, index)
        if getattr(model, "legacy", True):
            return model.cls(picked)
        return model.lm_predictions(picked, model.deberta.embeddings.word_embeddings)


class MaskedLMLoader:
    """``AutoModelForMaskedLM``, refusing a checkpoint whose MLM head would be newly initialised (random).

    The released DeBERTa-v3 checkpoints are ELECTRA-style replaced-token-detection discriminators: they carry the
    encoder and an RTD head (``mask_predictions``, which transformers drops on load), no MLM head, so a masked-LM
    model built from them predicts from random weights. DeBERTa v1/v2 checkpoints carry theirs, in the original
    layout (``lm_predictions.lm_head``, loaded with ``legacy=False``) or transformers' (``cls.predictions``).
    """

    @staticmethod
    def from_pretrained(src: str, **kwargs: Any) -> Any:
        """Loads ``src`` with its trained MLM head, in whichever layout it was saved.

        Raises:
            UnsupportedHeadError: the checkpoint has no MLM head weights.
        """
        model, info = AutoModelForMaskedLM.from_pretrained(src, output_loading_info=True, **kwargs)
        missing = _head_keys(info["missing_keys"])
        if missing and any(key.startswith("lm_predictions.lm_head.") for key in info["unexpected_keys"]):
            # The original DeBERTa layout under a config that asks for transformers' legacy one.
            model, info = AutoModelForMaskedLM.from_pretrained(src, output_loading_info=True, legacy=False, **kwargs)
            missing = _head_keys(info["missing_keys"])
        if missing:
            raise UnsupportedHeadError(
                f"{src} has no trained masked-LM head: its weights hold none of {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''}, which would be newly initialised (random), so fill-mask "
                "would predict noise. The released DeBERTa-v3 checkpoints are like this: ELECTRA-style "
                "replaced-token-detection discriminators, whose MLM head (the generator's) was not released. "
                "Fill-mask needs a DeBERTa v1/v2 checkpoint (e.g. microsoft/deberta-base, deberta-v2-xlarge) or one "
                "fine-tuned with an MLM head; pass --task embedding (ExportConfig(task='embedding')) to keep only the "
                "encoder, for sentence vectors."
            )
        return model


def _head_keys(keys: Any) -> list[str]:
    return sorted(str(key) for key in keys if str(key).startswith(_HEAD_PREFIXES))
