"""The PyTorch reference the runtime must match: DeBERTa's own SentencePiece tokenizer, transformers' model,
then masked mean pooling (or the [CLS] vector, or the masked maximum, as sentence-transformers computes them).

Written independently of the export stage (its tokenizer conversion and its pooling code), so the parity tests
compare two implementations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from transformers import AutoModel

CLS, SEP, PAD = 1, 2, 0


def reference_ids(checkpoint: Path, texts: list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    processor = spm.SentencePieceProcessor(model_file=str(checkpoint / "spm.model"))
    rows = [[CLS, *processor.encode(text)[: max_length - 2], SEP] for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


def reference_hidden(checkpoint: Path, texts: list[str], max_length: int = 512
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, attention mask) of the transformers model."""
    model = AutoModel.from_pretrained(checkpoint).eval()
    ids, mask = reference_ids(checkpoint, texts, max_length)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def reference_embeddings(checkpoint: Path, texts: list[str], max_length: int = 512, *, pooling: str = "mean",
                         normalize: bool = False) -> np.ndarray:
    hidden, mask = reference_hidden(checkpoint, texts, max_length)
    weights = mask.unsqueeze(-1).float()
    if pooling == "mean":
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = torch.where(weights > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
    else:
        raise ValueError(pooling)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled.numpy()
