"""Run exported DeBERTa models on ONNX Runtime: numpy, onnxruntime and tokenizers only, no PyTorch.

    from deberta_onnx.runtime import Encoder
    vectors = Encoder("out/deberta-v3-base").encode(["A sentence.", "Another one."])
"""

from __future__ import annotations

from .encoder import Encoder, EncoderConfig, TokenEmbeddings, normalize_rows
from .errors import (
    ChecksumMismatchError,
    ContractMismatchError,
    DebertaOnnxError,
    ManifestError,
    ModelFolderError,
    NotExportedError,
    ProviderUnavailableError,
    TaskMismatchError,
)
from .manifest import Manifest, load_manifest

__all__ = [
    "ChecksumMismatchError",
    "ContractMismatchError",
    "DebertaOnnxError",
    "Encoder",
    "EncoderConfig",
    "Manifest",
    "ManifestError",
    "ModelFolderError",
    "NotExportedError",
    "ProviderUnavailableError",
    "TaskMismatchError",
    "TokenEmbeddings",
    "load_manifest",
    "normalize_rows",
]
