"""The PyTorch reference the runtime must match: DeBERTa's own SentencePiece tokenizer, transformers' model,
then masked mean pooling.

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


def reference_embeddings(checkpoint: Path, texts: list[str], max_length: int = 512) -> np.ndarray:
    model = AutoModel.from_pretrained(checkpoint).eval()
    ids, mask = reference_ids(checkpoint, texts, max_length)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return pooled.numpy()
