"""Run exported DeBERTa models on ONNX Runtime: numpy, onnxruntime and tokenizers only, no PyTorch.

    from deberta_onnx.runtime import Encoder
    vectors = Encoder("out/deberta-v3-base").encode(["A sentence.", "Another one."])

The names here are the everyday API. The layers beneath, each a module importing only the ones below it:
``contract`` (tensor names, dtypes, axes, the session check), ``manifest`` (the folder's record, typed), ``config``,
``tokenization`` and ``batching`` (stage one), ``runners`` and ``iobinding`` (stage two), ``postprocess`` (stage
three), ``session`` and ``loader`` (folder -> loaded model), ``errors``, ``similarity``, ``server``, ``cli``.
"""

from __future__ import annotations

from importlib import metadata

from .classifier import CrossEncoder, SequenceClassifier, TokenClassifier
from .config import EncoderConfig
from .encoder import Encoder
from .errors import DebertaOnnxError
from .fill_mask import FillMask
from .installed import DISTRIBUTION
from .multiple_choice import MultipleChoice, MultipleChoiceResult
from .similarity import Hit, cos_sim, semantic_search
from .zero_shot import ZeroShotClassifier, ZeroShotResult

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CrossEncoder",
    "DebertaOnnxError",
    "Encoder",
    "EncoderConfig",
    "FillMask",
    "Hit",
    "MultipleChoice",
    "MultipleChoiceResult",
    "SequenceClassifier",
    "TokenClassifier",
    "ZeroShotClassifier",
    "ZeroShotResult",
    "__version__",
    "cos_sim",
    "semantic_search",
]
