"""Run exported DeBERTa models on ONNX Runtime: numpy, onnxruntime and tokenizers only, no PyTorch.

    from deberta_onnx.runtime import Encoder
    vectors = Encoder("out/deberta-v3-base").encode(["A sentence.", "Another one."])
"""

from __future__ import annotations

from .encoder import PREFERRED_PRECISIONS, Encoder, EncoderConfig, best_precision, normalize_rows
from .errors import (
    ChecksumMismatchError,
    ContractMismatchError,
    DebertaOnnxError,
    ManifestError,
    ModelFolderError,
    ProviderUnavailableError,
)
from .manifest import Manifest, load_manifest

__all__ = [
    "PREFERRED_PRECISIONS",
    "ChecksumMismatchError",
    "ContractMismatchError",
    "DebertaOnnxError",
    "Encoder",
    "EncoderConfig",
    "Manifest",
    "ManifestError",
    "ModelFolderError",
    "ProviderUnavailableError",
    "best_precision",
    "load_manifest",
    "normalize_rows",
]
