"""Zero-shot classification through an NLI model (``ZeroShotClassifier``): each candidate label becomes a
hypothesis ("This example is {label}."), each (text, hypothesis) pair goes through an exported
``...ForSequenceClassification`` NLI model, and the entailment logits become label scores exactly as transformers'
``zero-shot-classification`` pipeline computes them.

    from deberta_onnx.runtime import ZeroShotClassifier
    result = ZeroShotClassifier("models/nli").predict("The new phone lasts two days.", ["battery", "camera"])
    result.labels, result.scores  # best first
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np

from .batching import ModelCall
from .checks import check_positive_int
from .classifier import _load, _plan, _token_count
from .config import EncoderConfig
from .contract import TASK_SEQUENCE_CLASSIFICATION
from .errors import TaskMismatchError
from .loader import LoadedAttributes, loaded_property
from .postprocess import softmax
from .session import ProviderList
from .tokenization import check_texts

__all__ = [
    "DEFAULT_HYPOTHESIS_TEMPLATE",
    "ZeroShotClassifier",
    "ZeroShotResult",
    "entailment_index",
    "hypotheses",
    "label_order",
    "parse_candidate_labels",
    "zero_shot_scores",
]

# transformers' default, so that the same call gives the same scores.
DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."


class ZeroShotResult(NamedTuple):
    """One text's answer, in the shape of transformers' pipeline: its candidate labels best first, and their
    scores in that order."""

    sequence: str
    labels: list[str]
    scores: list[float]


def parse_candidate_labels(labels: str | Sequence[str]) -> list[str]:
    """The candidate labels as transformers' pipeline reads them: a list of str, or one str of comma-separated
    labels (each stripped; empty ones dropped).

    Raises:
        TypeError: ``labels`` is neither a str nor a list of str.
        ValueError: no label is left.
    """
    if isinstance(labels, str):
        found = [label.strip() for label in labels.split(",") if label.strip()]
    elif isinstance(labels, Sequence) and all(isinstance(label, str) for label in labels):
        found = list(labels)
    else:
        raise TypeError(f"candidate_labels must be a list of str or a comma-separated str, got {labels!r:.80}")
    if not found:
        raise ValueError("candidate_labels is empty; give at least one label, e.g. ['politics', 'sports']")
    return found


def hypotheses(labels: Sequence[str], template: str = DEFAULT_HYPOTHESIS_TEMPLATE) -> list[str]:
    """Each label put into ``template`` at its ``{}``, as the pipeline does (``template.format(label)``).

    Raises:
        ValueError: ``template`` has no ``{}`` to put a label in, or is not a valid format string.
    """
    if not isinstance(template, str):
        raise TypeError(f"hypothesis_template must be a str, got {type(template).__name__}")
    try:
        filled = [template.format(label) for label in labels]
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"hypothesis_template {template!r} is not a format string with one {{}} for the label "
                         f"({exc}); write it like 'This example is {{}}.'") from exc
    if template.format("") == template:
        raise ValueError(f"hypothesis_template {template!r} has no {{}} for the label; every hypothesis would be "
                         "the same. Write it like 'This example is {}.'")
    return filled


def entailment_index(labels: Sequence[str], model_dir: str | Path = "the model") -> int:
    """The logit column of entailment: the first label (in id order) that starts with "entail", in any case.

    Raises:
        TaskMismatchError: no label does; the model is not an NLI model, or its labels were saved as
            ``LABEL_0`` ... (re-export from a checkpoint whose config names them).
    """
    for index, label in enumerate(labels):
        if label.lower().startswith("entail"):
            return index
    raise TaskMismatchError(
        f"{model_dir} has labels {list(labels)}, none of which starts with 'entail'; zero-shot classification needs "
        "an NLI model and reads the entailment score from the label so named. Use an NLI checkpoint (e.g. a "
        "*-mnli or *-zeroshot fine-tune), or set its config's id2label/label2id to name the entailment label and "
        "export it again."
    )


def zero_shot_scores(logits: np.ndarray, *, entailment: int, multi_label: bool) -> np.ndarray:
    """Label scores from NLI logits, as transformers' pipeline computes them.

    Args:
        logits: ``[texts, labels, classes]``: the NLI logits of each (text, hypothesis of label) pair.
        entailment: the entailment column (``entailment_index``).
        multi_label: score each label on its own: the softmax of (contradiction, entailment), where contradiction
            is the first column, or the last when entailment is the first (the pipeline's rule). Otherwise the
            softmax of the entailment logits across the labels. One label is always scored on its own.

    Returns:
        float64 ``[texts, labels]``, in the candidate labels' order.
    """
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"logits must be [texts, labels, classes], got shape {values.shape}")
    classes = values.shape[2]
    if not -classes <= entailment < classes:
        raise ValueError(f"entailment index {entailment} is out of range for {classes} classes")
    if multi_label or values.shape[1] == 1:
        contradiction = -1 if entailment == 0 else 0
        return softmax(values[..., [contradiction, entailment]])[..., 1]
    return softmax(values[..., entailment])


def label_order(scores: np.ndarray) -> list[int]:
    """The labels of one text best first, as the pipeline orders them (``reversed(scores.argsort())``: equal
    scores come last label first)."""
    return [int(i) for i in reversed(np.asarray(scores).argsort())]


class ZeroShotClassifier(LoadedAttributes):
    """Zero-shot classification with an exported NLI model folder (a ``...ForSequenceClassification`` checkpoint
    whose labels include one starting with "entail", e.g. ``entailment``/``neutral``/``contradiction``), as
    transformers' ``pipeline("zero-shot-classification")``.

    Every (text, hypothesis) pair of a call is tokenized and batched by length with the others, so that a text's
    labels run in the same model call where they fit (the default batch holds at least all labels of one text).
    A pair longer than the model's maximum is cut longest text first, which cuts the text, as the pipeline does,
    unless the hypothesis is the longer of the two.

    Loading options and errors are those of ``Encoder``; ``TaskMismatchError`` if the folder holds another kind of
    model, or a classifier without an entailment label.
    """

    def __init__(self, model_dir: str | Path, providers: ProviderList | None = None, *,
                 config: EncoderConfig | None = None) -> None:
        self.config, self.loaded = _load(model_dir, providers, config, TASK_SEQUENCE_CLASSIFICATION,
                                         type(self).__name__)
        self.entailment = entailment_index(self.labels, self.model_dir)

    labels = loaded_property(lambda m: m.labels, "The NLI model's labels in logit order (its ``id2label``).")

    def pairs(self, sequences: str | Sequence[str], candidate_labels: str | Sequence[str],
              hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE) -> list[tuple[str, str]]:
        """The (text, hypothesis) pairs the model runs: text by text, each text with every label in order.

        Raises:
            TypeError / ValueError: as ``predict``.
        """
        texts = [sequences] if isinstance(sequences, str) else check_texts(sequences)
        filled = hypotheses(parse_candidate_labels(candidate_labels), hypothesis_template)
        return [(text, hypothesis) for text in texts for hypothesis in filled]

    def token_count(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens the model sees per pair (special tokens included, after truncation)."""
        return _token_count(self.loaded, list(pairs))

    def plan(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, *, truncate: bool = True
             ) -> Iterator[ModelCall]:
        """The model calls of ``pairs`` (from ``pairs``), run one by one by the caller (the server): each
        ``call.run()`` gives the NLI logits ``[len(call.rows), len(labels)]`` of ``call.rows``, positions in
        ``pairs``; ``zero_shot_scores`` turns them, reshaped to ``[texts, candidate labels, classes]``, into scores.
        """
        check_positive_int("batch_size", batch_size, optional=True)
        return _plan(self.loaded, self.loaded.runner, list(pairs), batch_size, truncate, False)

    def scores(self, sequences: str | Sequence[str], candidate_labels: str | Sequence[str], *,
               hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False,
               batch_size: int | None = None, truncate: bool = True, show_progress: bool = False) -> np.ndarray:
        """Label scores (``zero_shot_scores``) per text, float64 ``[texts, labels]`` in the candidate labels' order
        (``[labels]`` for a single str). Arguments and errors as ``predict``."""
        labels = parse_candidate_labels(candidate_labels)
        pairs = self.pairs(sequences, labels, hypothesis_template)
        check_positive_int("batch_size", batch_size, optional=True)
        rows = self.loaded.policy.default_rows
        if batch_size is None and rows is not None:
            batch_size = max(rows, len(labels))  # one text's labels in one call (within the token budget)
        logits = np.empty((len(pairs), len(self.labels)), dtype=np.float32)
        for call in _plan(self.loaded, self.loaded.runner, pairs, batch_size, truncate, show_progress):
            logits[call.rows] = call.run()
        out = zero_shot_scores(logits.reshape(-1, len(labels), len(self.labels)), entailment=self.entailment,
                               multi_label=multi_label)
        return out[0] if isinstance(sequences, str) else out

    @overload
    def predict(self, sequences: str, candidate_labels: str | Sequence[str], *,  # type: ignore[overload-overlap]
                hypothesis_template: str = ...,
                multi_label: bool = ..., batch_size: int | None = ..., truncate: bool = ...,
                show_progress: bool = ...) -> ZeroShotResult: ...
    @overload
    def predict(self, sequences: Sequence[str], candidate_labels: str | Sequence[str], *,
                hypothesis_template: str = ..., multi_label: bool = ..., batch_size: int | None = ...,
                truncate: bool = ..., show_progress: bool = ...) -> list[ZeroShotResult]: ...

    def predict(self, sequences: str | Sequence[str], candidate_labels: str | Sequence[str], *,
                hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False,
                batch_size: int | None = None, truncate: bool = True, show_progress: bool = False
                ) -> ZeroShotResult | list[ZeroShotResult]:
        """Scores each candidate label for each text, as ``pipeline("zero-shot-classification")(sequences,
        candidate_labels, hypothesis_template=..., multi_label=...)`` does.

        Args:
            sequences: a text, or a list of texts.
            candidate_labels: the labels to choose from: a list of str, or one comma-separated str.
            hypothesis_template: the hypothesis each label is put into, at its ``{}``.
            multi_label: score each label on its own (entailment against contradiction; several labels may be
                true); otherwise the scores are a softmax across the labels and sum to 1.
            batch_size: pairs per model call (``None``: 32, or the number of labels if more; fewer where
                ``config.max_tokens`` allows fewer).
            truncate: cut pairs longer than the model's maximum (default); else raise.
            show_progress: show a progress bar (tqdm) over the pairs.

        Returns:
            A ``ZeroShotResult(sequence, labels, scores)`` per text, labels best first (equal scores last label
            first, as the pipeline); one for a single str.

        Raises:
            TypeError: ``sequences`` is not a str or a list of str, or ``candidate_labels`` not a str or list of str.
            ValueError: no candidate label, a template without ``{}``, ``batch_size`` < 1, or
                ``truncate`` is false and a pair is too long.
        """
        labels = parse_candidate_labels(candidate_labels)
        scores = self.scores(sequences, labels, hypothesis_template=hypothesis_template, multi_label=multi_label,
                             batch_size=batch_size, truncate=truncate, show_progress=show_progress)
        texts = [sequences] if isinstance(sequences, str) else list(sequences)
        results = []
        for text, row in zip(texts, np.atleast_2d(scores)):
            order = label_order(row)
            results.append(ZeroShotResult(text, [labels[i] for i in order], [float(row[i]) for i in order]))
        return results[0] if isinstance(sequences, str) else results

    __call__ = predict
