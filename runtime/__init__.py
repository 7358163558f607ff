"""Run exported DeBERTa models on ONNX Runtime: numpy, onnxruntime and tokenizers only, no PyTorch.

    from deberta_onnx.runtime import Encoder
    vectors = Encoder("out/deberta-v3-base").encode(["A sentence.", "Another one."])
"""

from __future__ import annotations

from .classifier import CrossEncoder, Prediction, SequenceClassifier, Span, TokenClassifier
from .encoder import Encoder, EncoderConfig, TokenEmbeddings, normalize_rows
from .errors import (
    ChecksumMismatchError,
    ContractMismatchError,
    CudaGraphError,
    DebertaOnnxError,
    ManifestError,
    ModelFolderError,
    NotExportedError,
    ProviderUnavailableError,
    TaskMismatchError,
)
from .manifest import Manifest, load_manifest
from .similarity import Hit, cos_sim, dot_score, semantic_search

__all__ = [
    "ChecksumMismatchError",
    "ContractMismatchError",
    "CrossEncoder",
    "CudaGraphError",
    "DebertaOnnxError",
    "Encoder",
    "EncoderConfig",
    "Hit",
    "Manifest",
    "ManifestError",
    "ModelFolderError",
    "NotExportedError",
    "Prediction",
    "ProviderUnavailableError",
    "SequenceClassifier",
    "Span",
    "TaskMismatchError",
    "TokenClassifier",
    "TokenEmbeddings",
    "cos_sim",
    "dot_score",
    "load_manifest",
    "normalize_rows",
    "semantic_search",
]
