"""Run exported DeBERTa models on ONNX Runtime: numpy, onnxruntime and tokenizers only, no PyTorch.

    from deberta_onnx.runtime import Encoder
    vectors = Encoder("out/deberta-v3-base").encode(["A sentence.", "Another one."])

The names here are the everyday API. The layers beneath, each a module importing only the ones below it:
``contract`` (tensor names, dtypes, axes, the session check), ``manifest`` (the folder's record, typed), ``config``,
``tokenization`` and ``batching`` (stage one), ``runners`` and ``iobinding`` (stage two), ``postprocess`` (stage
three), ``session`` and ``loader`` (folder -> loaded model), ``errors``, ``similarity``, ``server``, ``cli``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classifier import CrossEncoder, SequenceClassifier, TokenClassifier
    from .config import EncoderConfig
    from .encoder import Encoder
    from .errors import DebertaOnnxError
    from .fill_mask import FillMask, FillMaskCandidate
    from .multiple_choice import MultipleChoice, MultipleChoiceResult
    from .question_answering import Answer, QuestionAnswerer
    from .similarity import Hit, cos_sim, semantic_search
    from .zero_shot import ZeroShotClassifier, ZeroShotResult

    __version__: str

# The everyday names, imported on first use (PEP 562): `import deberta_onnx.runtime.cli` (the `deberta-onnx`
# command's entry point) then imports nothing heavy before the command's own error handling runs, so that a Ctrl+C
# while numpy and ONNX Runtime load is one "interrupted" line, and commands that need neither start faster.
_LAZY = {
    "Answer": "question_answering",
    "QuestionAnswerer": "question_answering",
    "CrossEncoder": "classifier",
    "SequenceClassifier": "classifier",
    "TokenClassifier": "classifier",
    "EncoderConfig": "config",
    "Encoder": "encoder",
    "DebertaOnnxError": "errors",
    "FillMask": "fill_mask",
    "FillMaskCandidate": "fill_mask",
    "MultipleChoice": "multiple_choice",
    "MultipleChoiceResult": "multiple_choice",
    "Hit": "similarity",
    "cos_sim": "similarity",
    "semantic_search": "similarity",
    "ZeroShotClassifier": "zero_shot",
    "ZeroShotResult": "zero_shot",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib import metadata

        from .installed import DISTRIBUTION

        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:  # a source tree that was never installed
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Answer",
    "CrossEncoder",
    "DebertaOnnxError",
    "Encoder",
    "EncoderConfig",
    "FillMask",
    "FillMaskCandidate",
    "Hit",
    "MultipleChoice",
    "MultipleChoiceResult",
    "QuestionAnswerer",
    "SequenceClassifier",
    "TokenClassifier",
    "ZeroShotClassifier",
    "ZeroShotResult",
    "__version__",
    "cos_sim",
    "semantic_search",
]
