"""The sentences shipped with the package, which the runtime holds (``deberta_onnx.runtime.sentences``): the
default calibration and held-out texts of the precision variants, and the training text of random checkpoints'
tokenizers."""

from __future__ import annotations

from deberta_onnx.runtime.sentences import shipped_sentences

__all__ = ["shipped_sentences"]
