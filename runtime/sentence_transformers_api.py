"""sentence-transformers' call shape: the keyword names its ``SentenceTransformer.encode`` and
``CrossEncoder.predict`` / ``rank`` take, resolved onto this package's own options, and clear refusals for the
ones that only make sense with torch. ``Encoder`` and ``CrossEncoder`` accept them as aliases, so code (and
libraries) written for sentence-transformers call them unchanged.

    encoder.encode(docs, show_progress_bar=False, normalize_embeddings=True, convert_to_numpy=True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypedDict, TypeVar

import numpy as np

from .config import parse_device
from .contract import PRECISIONS
from .postprocess import EMBEDDING_PRECISIONS

__all__ = [
    "EncodeKeywords",
    "PredictKeywords",
    "RankKeywords",
    "alias",
    "check_embedding_precision",
    "check_keywords",
    "with_prompt",
]

T = TypeVar("T")
Item = TypeVar("Item", str, tuple[str, str], str | tuple[str, str])


class EncodeKeywords(TypedDict, total=False):
    """sentence-transformers' names that ``Encoder.encode`` accepts beside its own.

    Attributes:
        normalize_embeddings: ``normalize``.
        show_progress_bar: ``show_progress``; ``None`` leaves it as ``show_progress`` says (off by default).
        truncate_dim: ``dimensions``.
        convert_to_numpy: must be true (the default): the output is a numpy array.
        convert_to_tensor: must be false (the default): torch is not used.
        device: ``None`` or the device the model was loaded on; the device is chosen at load.
        prompt_name: refused: model folders record no named prompts; pass the prompt itself as ``prompt``.
    """

    normalize_embeddings: bool
    show_progress_bar: bool | None
    truncate_dim: int | None
    convert_to_numpy: bool
    convert_to_tensor: bool
    device: object
    prompt_name: str | None


class RankKeywords(TypedDict, total=False):
    """sentence-transformers' names that ``CrossEncoder.rank`` accepts beside its own (see ``PredictKeywords``)."""

    show_progress_bar: bool | None
    activation_fn: Callable[[np.ndarray], np.ndarray] | None
    device: object
    prompt_name: str | None


class PredictKeywords(RankKeywords, total=False):
    """sentence-transformers' names that ``CrossEncoder.predict`` accepts beside its own.

    Attributes:
        show_progress_bar: ``show_progress``.
        activation_fn: a function of the numpy logits ``[n, labels]`` applied instead of the model's activation
            (not a torch module: torch is not used).
        apply_softmax: softmax over the labels after the activation, for models with several labels.
        convert_to_numpy, convert_to_tensor, device, prompt_name: as in ``EncodeKeywords``.
    """

    apply_softmax: bool
    convert_to_numpy: bool
    convert_to_tensor: bool


def check_keywords(method: str, keywords: Mapping[str, object], allowed: type, *, device: str) -> None:
    """Refuses sentence-transformers keywords that cannot apply here, and names that are neither ours nor theirs.

    Args:
        method: the method's name, for messages (``"Encoder.encode"``).
        keywords: the keyword arguments beyond the method's own.
        allowed: the ``TypedDict`` listing the sentence-transformers names the method accepts.
        device: where the model runs (``"cpu"``, ``"cuda:0"``).

    Raises:
        TypeError: an unknown keyword.
        ValueError: ``convert_to_tensor=True``, ``convert_to_numpy=False``, a ``device`` other than the loaded one,
            or a ``prompt_name``.
    """
    names = allowed.__annotations__
    for name in keywords:
        if name not in names:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}; besides its own, it takes "
                            f"sentence-transformers' {', '.join(sorted(names))}")
    if keywords.get("convert_to_tensor"):
        raise ValueError(f"convert_to_tensor=True asks {method} for a torch tensor, but deberta-onnx returns numpy "
                         "arrays and does not use torch; drop it (or wrap the result: torch.from_numpy(out))")
    if keywords.get("convert_to_numpy", True) is False:
        raise ValueError(f"convert_to_numpy=False asks {method} for torch tensors, but deberta-onnx returns numpy "
                         "arrays and does not use torch; drop it")
    if keywords.get("prompt_name") is not None:
        raise ValueError(f"prompt_name={keywords['prompt_name']!r}: deberta-onnx model folders record no named "
                         "prompts; pass the prompt text itself, e.g. prompt='query: '")
    _check_device(keywords.get("device"), device)


def _check_device(requested: object, loaded: str) -> None:
    if requested is None:
        return
    if isinstance(requested, (list, tuple)):
        raise ValueError(f"device={requested!r} asks for encoding in several processes, which deberta-onnx does not "
                         "do; load one model per device instead")
    kind, index = parse_device(str(requested))  # a torch.device prints as "cuda:0"
    loaded_kind, loaded_index = parse_device(loaded)
    if kind != loaded_kind or (":" in str(requested) and index != loaded_index):
        raise ValueError(f"device={str(requested)!r}, but this model was loaded on {loaded}; the device is chosen "
                         f"at load: pass config=EncoderConfig(device={str(requested)!r}) when creating it")


def alias(name: str, value: T, default: T, st_name: str, st_value: T | None) -> T:
    """The value of an option given under our name or sentence-transformers' (``st_value``, ``None`` if not given).

    Raises:
        ValueError: both are given and disagree.
    """
    if st_value is None:
        return value
    if value != default and value != st_value:
        raise ValueError(f"{name}={value!r} and {st_name}={st_value!r} disagree; pass one of them ({st_name} is "
                         f"sentence-transformers' name for {name})")
    return st_value


def check_embedding_precision(precision: str) -> None:
    """Raises ``ValueError`` unless ``precision`` names an embedding quantization (``EMBEDDING_PRECISIONS``).

    sentence-transformers' ``precision`` says how the output vectors are stored; the model variant that computes
    them (fp32, int8-static, ...) is chosen at load, and the message says so when one is passed here.
    """
    if precision in EMBEDDING_PRECISIONS:
        return
    hint = ""
    if precision in PRECISIONS:
        hint = (f"; {precision!r} is a model variant, chosen at load: "
                f"Encoder(model_dir, config=EncoderConfig(precision={precision!r}))")
    raise ValueError(f"precision (how the returned vectors are stored, as in sentence-transformers) must be one of "
                     f"{', '.join(EMBEDDING_PRECISIONS)}, got {precision!r}{hint}")


def with_prompt(items: Sequence[Item], prompt: str | None) -> list[Item]:
    """``prompt`` prepended to each text, or to the first text of each pair, as sentence-transformers does.

    Raises:
        TypeError: ``prompt`` is not a str.
    """
    if prompt is None or prompt == "":
        return list(items)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return [prompt + item if isinstance(item, str) else (prompt + item[0], item[1]) for item in items]
