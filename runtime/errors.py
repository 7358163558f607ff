"""Named exceptions a caller may want to catch. Bad arguments raise ``ValueError`` or ``TypeError``."""

from __future__ import annotations

__all__ = [
    "ChecksumMismatchError",
    "ContractMismatchError",
    "CudaGraphError",
    "DebertaOnnxError",
    "ManifestError",
    "MemoryLimitError",
    "MissingExtraError",
    "ModelFolderError",
    "ModelLoadError",
    "NotExportedError",
    "ProviderUnavailableError",
    "TaskMismatchError",
]


class DebertaOnnxError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFolderError(DebertaOnnxError):
    """A model folder is missing, incomplete or inconsistent. Raised at load, before any inference."""


class ManifestError(ModelFolderError):
    """``manifest.json`` is missing, unreadable, or of a version this runtime does not know."""


class ChecksumMismatchError(ModelFolderError):
    """A file's sha256 differs from the one the manifest records: the file is corrupted or was replaced."""


class ContractMismatchError(ModelFolderError):
    """The ONNX graph or tokenizer does not match the contract the manifest declares."""


class ModelLoadError(ModelFolderError):
    """ONNX Runtime could not load a model file (a corrupt or truncated graph, an operator it lacks, out of
    memory): the message names the file and ONNX Runtime's own cause."""
class MemoryLimitError(DebertaOnnxError):
    """One model call of the longest input the folder allows would need more memory than
    ``EncoderConfig.max_call_memory_mb`` permits; raised at load, before any allocation."""


class ProviderUnavailableError(DebertaOnnxError):
    """A requested ONNX Runtime execution provider is not installed, or ONNX Runtime fell back from it."""


class CudaGraphError(DebertaOnnxError):
    """A CUDA graph cannot be used: ONNX Runtime refused to capture one for this model, or a graph captured for
    one (batch, sequence) shape and set of buffers was about to be replayed for another."""


class TaskMismatchError(ModelFolderError):
    """The folder holds another kind of model (an embedding model, a sequence or token classifier) than the
    class loading it runs; the message names the class to use."""


class NotExportedError(DebertaOnnxError):
    """The call needs a graph output that the folder was exported without (e.g. token embeddings)."""


class MissingExtraError(ImportError):
    """An optional part of the package was used without its extra installed; the message names the pip command.

    An ``ImportError`` (what a caller guarding an optional import already catches), not a ``DebertaOnnxError``.
    """
