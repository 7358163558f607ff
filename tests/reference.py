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


# Extractive question answering: transformers 4.x's ``question-answering`` pipeline (removed in transformers 5), its
# fast-tokenizer path ported function for function from transformers 4.48 (``pipelines/question_answering.py``:
# ``preprocess``, ``decode_spans``, ``select_starts_ends``, ``postprocess``, ``get_indices``), on the PyTorch model's
# logits. Kept as the pipeline wrote it, quirks included, so that the runtime is compared with the pipeline itself.


def _decode_spans(start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int,
                  undesired_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores


def _select_starts_ends(start: np.ndarray, end: np.ndarray, p_mask: np.ndarray, attention_mask: np.ndarray,
                        min_null_score: float, top_k: int, handle_impossible_answer: bool, max_answer_len: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    undesired_tokens = np.abs(np.array(p_mask) - 1)
    if attention_mask is not None:
        undesired_tokens = undesired_tokens & attention_mask
    undesired_tokens_mask = undesired_tokens == 0.0
    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    starts, ends, scores = _decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def _get_indices(enc: object, s: int, e: int, sequence_index: int, align_to_words: bool) -> tuple[int, int]:
    if align_to_words:
        try:
            start_word = enc.token_to_word(s)  # type: ignore[attr-defined]
            end_word = enc.token_to_word(e)  # type: ignore[attr-defined]
            start_index = enc.word_to_chars(start_word, sequence_index=sequence_index)[0]  # type: ignore[attr-defined]
            end_index = enc.word_to_chars(end_word, sequence_index=sequence_index)[1]  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001  as the pipeline: "some tokenizers don't really handle words"
            start_index = enc.offsets[s][0]  # type: ignore[attr-defined]
            end_index = enc.offsets[e][1]  # type: ignore[attr-defined]
    else:
        start_index = enc.offsets[s][0]  # type: ignore[attr-defined]
        end_index = enc.offsets[e][1]  # type: ignore[attr-defined]
    return start_index, end_index


def reference_qa_features(tokenizer: object, question: str, context: str, *, max_seq_len: int | None = None,
                          doc_stride: int | None = None) -> list[dict[str, object]]:
    """The pipeline's ``preprocess`` (fast tokenizer, padding on the right): one feature per window."""
    if max_seq_len is None:
        max_seq_len = min(tokenizer.model_max_length, 384)  # type: ignore[attr-defined]
    if doc_stride is None:
        doc_stride = min(max_seq_len // 2, 128)
    encoded_inputs = tokenizer(  # type: ignore[operator]
        text=question, text_pair=context, padding="do_not_pad", truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True,
        return_special_tokens_mask=True)
    num_spans = len(encoded_inputs["input_ids"])
    p_mask = [[tok != 1 for tok in encoded_inputs.sequence_ids(span_id)] for span_id in range(num_spans)]
    features = []
    for span_idx in range(num_spans):
        input_ids_span_idx = encoded_inputs["input_ids"][span_idx]
        cls_token_id = tokenizer.cls_token_id  # type: ignore[attr-defined]
        if cls_token_id is not None:
            for cls_index in np.nonzero(np.array(input_ids_span_idx) == cls_token_id)[0]:
                p_mask[span_idx][cls_index] = 0
        features.append({"input_ids": input_ids_span_idx,
                         "attention_mask": encoded_inputs["attention_mask"][span_idx],
                         "token_type_ids": encoded_inputs["token_type_ids"][span_idx],
                         "p_mask": p_mask[span_idx], "encoding": encoded_inputs[span_idx]})
    return features


def reference_answers(model: torch.nn.Module, tokenizer: object, question: str, context: str, *, top_k: int = 1,
                      handle_impossible_answer: bool = False, max_answer_len: int = 15, align_to_words: bool = True,
                      max_seq_len: int | None = None, doc_stride: int | None = None,
                      logits: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict[str, object]]:
    """The pipeline's answers (always a list; the pipeline returns a lone answer unwrapped): each window through
    ``model`` alone, unpadded, as the pipeline runs it, then ``postprocess``. ``logits`` replaces the model's
    ``(start, end)`` per window (hand-built cases)."""
    features = reference_qa_features(tokenizer, question, context, max_seq_len=max_seq_len, doc_stride=doc_stride)
    min_null_score = 1000000
    answers: list[dict[str, object]] = []
    for number, feature in enumerate(features):
        ids = torch.tensor([feature["input_ids"]])
        mask = torch.tensor([feature["attention_mask"]])
        if logits is None:
            with torch.no_grad():
                output = model(input_ids=ids, attention_mask=mask)
            start_, end_ = output.start_logits.numpy(), output.end_logits.numpy()
        else:
            start_, end_ = (np.asarray(x, dtype=np.float32)[None] for x in logits[number])
        p_mask = np.array([feature["p_mask"]], dtype=np.int64)
        starts, ends, scores, min_null_score = _select_starts_ends(
            start_, end_, p_mask, mask.numpy(), min_null_score, top_k, handle_impossible_answer, max_answer_len)
        for s, e, score in zip(starts, ends, scores):
            start_index, end_index = _get_indices(feature["encoding"], s, e, 1, align_to_words)
            answers.append({"score": score.item(), "start": start_index, "end": end_index,
                            "answer": context[start_index:end_index]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
