"""Fill-mask (``FillMask``): the most likely tokens at each ``[MASK]`` of a text, with an exported masked-LM folder
(``DebertaV2ForMaskedLM`` / ``DebertaForMaskedLM``, ``--task fill-mask``), as transformers' ``fill-mask`` pipeline
gives them: the same candidates, scores, token strings and filled-in sequences, ``targets=`` included.

    from deberta_onnx.runtime import FillMask
    FillMask("models/deberta-base-mlm")("The capital of France is [MASK].", top_k=3)
    # [{"score": ..., "token": ..., "token_str": ..., "sequence": ...}, ...]

The graph scores the masked positions only: the runtime finds them in the token ids and passes them as the
``mask_positions`` input, so the ``[batch, sequence, vocab]`` scores of every position are never computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from .batching import ModelCall, TokenBatch, capped, token_batches
from .checks import check_positive_int
from .classifier import _load
from .config import EncoderConfig
from .contract import ATTENTION_MASK, INPUT_IDS, LOGITS, MASK_POSITIONS, TASK_FILL_MASK
from .errors import ModelFolderError
from .loader import LoadedAttributes, LoadedModel, loaded_property
from .postprocess import softmax
from .session import ProviderList
from .tokenization import check_texts

__all__ = ["DEFAULT_TOP_K", "FillMask", "FillMaskCandidate", "fill_mask_candidates"]

# transformers' default, so that the same call gives the same answer.
DEFAULT_TOP_K = 5


class FillMaskCandidate(TypedDict):
    """One candidate for one ``[MASK]``, in the shape of transformers' pipeline."""

    score: float
    token: int
    token_str: str
    sequence: str


class FillMask(LoadedAttributes):
    """Fills ``[MASK]`` tokens with an exported masked-LM model folder, as ``pipeline("fill-mask")``.

    Texts are tokenized, batched by length, and each call's masked positions are scored in the graph. Loading
    options and errors are those of ``Encoder``; ``TaskMismatchError`` if the folder holds another kind of model.

    Raises:
        ModelFolderError: the folder's tokenizer has no token for the manifest's ``mask_token``.
        ValueError: the model is loaded on OpenVINO (``engine``): fill-mask feeds its own ``mask_positions`` input
            through ONNX Runtime; load it with ``engine="onnxruntime"``.
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config, self.loaded = _load(model_dir, providers, config, TASK_FILL_MASK, type(self).__name__,
                                         onnxruntime_only=f"it feeds the {MASK_POSITIONS} input itself")
        token = self.loaded.manifest.model.mask_token or "[MASK]"
        mask_id = self.loaded.tokenizer.tokenizer.token_to_id(token)
        if mask_id is None:
            raise ModelFolderError(f"{self.loaded.model_dir}: the tokenizer has no {token!r} token, which its manifest "
                                   "names as the mask token; re-export the model folder.")
        self.mask_token: str = token
        self.mask_token_id: int = int(mask_id)

    vocab_size = loaded_property(lambda m: m.manifest.model.vocab_size, "Scores per masked position (the "
                                                                        "model's vocabulary, padding rows included).")

    def token_count(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model sees per text (special tokens included, after truncation)."""
        return [len(e.ids) for e in self.loaded.tokenizer.encodings(check_texts(texts))]

    def target_ids(self, targets: str | Sequence[str]) -> list[int]:
        """The token ids of ``targets`` as the pipeline finds them: a target that is a token of the vocabulary is
        that token, any other its first token (a target that gives none is dropped); duplicates removed, in the
        pipeline's order (``list(set(ids))``).

        Raises:
            TypeError: ``targets`` is neither a str nor a list of str.
            ValueError: no target is left.
        """
        listed = [targets] if isinstance(targets, str) else check_texts(targets)
        tokenizer = self.loaded.tokenizer.tokenizer
        ids = []
        for target in listed:
            found = tokenizer.token_to_id(target)
            if found is None:
                pieces = tokenizer.encode(target, add_special_tokens=False).ids
                if not pieces:
                    continue
                found = pieces[0]
            ids.append(int(found))
        unique = list(set(ids))
        if not unique:
            raise ValueError(f"targets {listed!r:.80} give no token of this model's vocabulary; give at least one "
                             "word or token it knows")
        return unique

    def plan(self, texts: Sequence[str], batch_size: int | None = None, *, truncate: bool = True,
             max_tokens: int | None = None) -> Iterator[ModelCall]:
        """The model calls of ``texts``, run one by one by the caller (the server): each ``call.run()`` gives a
        list with, per text of ``call.rows`` (positions in ``texts``), ``(logits [masks, vocab], token ids)``.

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: a text has no mask token (after truncation), ``batch_size`` < 1, or ``truncate`` is false
                and a text is too long.
        """
        items = check_texts(texts)
        check_positive_int("batch_size", batch_size, optional=True)
        loaded = self.loaded
        policy = capped(loaded.policy, max_tokens)
        for batch in token_batches(loaded.tokenizer, items, policy, batch_size, truncate=truncate):
            for row, encoding in zip(batch.rows, batch.encodings):
                self._check_mask(f"texts[{row}]", encoding.ids)
            yield ModelCall(rows=batch.rows, token_counts=[len(e.ids) for e in batch.encodings],
                            run=partial(_run, loaded, batch, self.mask_token_id),
                            padded_tokens=batch.input_ids.size)

    def check_masks(self, texts: Sequence[str], *, name: str = "texts") -> None:
        """Checks that each text keeps a mask token among the tokens the model sees (after truncation), as
        ``plan`` does batch by batch; the server checks a request this way before queueing it.

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: the first text without one, as ``{name}[INDEX]``.
        """
        for index, encoding in enumerate(self.loaded.tokenizer.encodings(check_texts(texts))):
            self._check_mask(f"{name}[{index}]", encoding.ids)

    def _check_mask(self, where: str, ids: Sequence[int]) -> None:
        if self.mask_token_id in ids:
            return
        cut = (f" (it may have been cut off: the text is longer than the model's maximum of "
               f"{self.loaded.max_length} tokens)") if len(ids) >= self.loaded.max_length else ""
        raise ValueError(f"{where} has no mask token {self.mask_token}{cut}; mark each position to fill with "
                         f"{self.mask_token}, e.g. 'Paris is the {self.mask_token} of France.'")

    def logits(self, texts: Sequence[str], *, batch_size: int | None = None, truncate: bool = True
               ) -> list[np.ndarray]:
        """Per text, the logits ``[masks, vocab]`` at its mask tokens, in position order."""
        out: list[Any] = [None] * len(texts)
        for call in self.plan(texts, batch_size, truncate=truncate):
            for row, (logits, _) in zip(call.rows, call.run()):
                out[row] = logits
        return out

    def predict(self, inputs: str | Sequence[str], *, top_k: int = DEFAULT_TOP_K,
                targets: str | Sequence[str] | None = None, batch_size: int | None = None, truncate: bool = True
                ) -> list[Any]:
        """The ``top_k`` candidates for each mask token, as ``pipeline("fill-mask")(inputs, top_k=..., targets=...)``.

        Args:
            inputs: a text with one or more mask tokens, or a list of such texts.
            top_k: candidates per mask (fewer when ``targets`` gives fewer).
            targets: score only these tokens (``target_ids``).
            batch_size: texts per model call (``None``: 32, fewer where ``config.max_tokens`` allows fewer).
            truncate: cut texts longer than the model's maximum (default); else raise.

        Returns:
            As the pipeline: for a text with one mask, its candidates (``FillMaskCandidate`` dicts, best first);
            with several masks, a list of such lists, one per mask in text order; for a list of texts, a list of
            those (a list of one text gives that text's answer alone, as the pipeline does).

        Raises:
            TypeError: ``inputs`` or ``targets`` are not str / lists of str.
            ValueError: a text has no mask token, ``top_k`` < 1, no usable target, ``batch_size`` < 1, or
                ``truncate`` is false and a text is too long.
        """
        check_positive_int("top_k", top_k)
        texts = [inputs] if isinstance(inputs, str) else check_texts(inputs)
        ids = None if targets is None else np.asarray(self.target_ids(targets), dtype=np.int64)
        answers: list[Any] = [None] * len(texts)
        for call in self.plan(texts, batch_size, truncate=truncate):
            for row, (logits, token_ids) in zip(call.rows, call.run()):
                answers[row] = fill_mask_candidates(logits, token_ids, self, top_k=top_k, target_ids=ids)
        return answers[0] if isinstance(inputs, str) or len(texts) == 1 else answers

    __call__ = predict


def fill_mask_candidates(logits: np.ndarray, token_ids: Sequence[int], model: FillMask, *, top_k: int,
                         target_ids: np.ndarray | None = None) -> list[Any]:
    """One text's answer from its masks' logits ``[masks, vocab]`` and its token ids, as the pipeline's
    post-processing gives it: the softmax over the vocabulary (then restricted to ``target_ids``), the ``top_k``
    best, each with the text decoded with that token in place (special tokens dropped when the text has one mask;
    with several, kept, the other masks standing as they are)."""
    tokenizer = model.loaded.tokenizer.tokenizer
    pad_id = model.loaded.tokenizer.pad_id
    ids = np.asarray(token_ids, dtype=np.int64)
    positions = np.flatnonzero(ids == model.mask_token_id)
    probabilities = softmax(np.asarray(logits, dtype=np.float32))
    if target_ids is not None:
        probabilities = probabilities[:, target_ids]
    k = min(top_k, probabilities.shape[1])
    single = len(positions) == 1
    answer = []
    for position, row in zip(positions, probabilities):
        # Best first; equal scores in vocabulary order, as torch.topk gives them on the CPU.
        best = np.argsort(-row, kind="stable")[:k]
        candidates: list[FillMaskCandidate] = []
        for choice in best:
            token = int(target_ids[choice]) if target_ids is not None else int(choice)
            filled = ids.copy()
            filled[position] = token
            filled = filled[filled != pad_id]
            candidates.append({"score": float(row[choice]), "token": token,
                               "token_str": tokenizer.decode([token], skip_special_tokens=False),
                               "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=single)})
        answer.append(candidates)
    return answer[0] if single else answer


def _run(loaded: LoadedModel, batch: TokenBatch, mask_id: int) -> list[tuple[np.ndarray, list[int]]]:
    ids, mask = batch.input_ids, batch.attention_mask
    masked = (ids == mask_id) & (mask > 0)
    counts = masked.sum(axis=1)
    positions = np.zeros((len(ids), max(1, int(counts.max(initial=0)))), dtype=np.int64)
    for row in range(len(ids)):
        found = np.flatnonzero(masked[row])
        positions[row, : len(found)] = found
    session = loaded.session
    if session is None:  # FillMask refuses such a model when it loads
        raise ValueError(f"{loaded.model_dir} has no ONNX Runtime session to run fill-mask on")
    (logits,) = session.run([LOGITS], {INPUT_IDS: ids, ATTENTION_MASK: mask, MASK_POSITIONS: positions})
    return [(logits[row, : counts[row]].copy(), list(encoding.ids))
            for row, encoding in enumerate(batch.encodings)]
