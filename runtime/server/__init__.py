"""An HTTP server of exported folders on Starlette + uvicorn: OpenAI-compatible embeddings, Cohere/Jina-shaped
rerank, classify, Prometheus metrics.

    deberta-onnx serve models/deberta-v3-base models/reranker --port 8000

or from Python::

    from deberta_onnx.runtime import CrossEncoder, Encoder, SequenceClassifier
    from deberta_onnx.runtime.server import ServerConfig, serve
    serve([Encoder("models/deberta-v3-base"), SequenceClassifier("models/reranker")], ServerConfig(port=8000))

``ServerConfig`` needs only the standard library; ``create_app`` and ``serve`` need the ``server`` extra
(``pip install 'deberta-onnx[server]'``) and say so when it is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .config import ServerConfig

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..classifier import SequenceClassifier, TokenClassifier
    from ..encoder import Encoder
    from ..fill_mask import FillMask
    from ..multiple_choice import MultipleChoice
    from ..question_answering import QuestionAnswerer

    _Model = Encoder | SequenceClassifier | TokenClassifier | QuestionAnswerer | MultipleChoice | FillMask
    _Models = _Model | Sequence[_Model] | Mapping[str, _Model]

__all__ = ["ServerConfig", "create_app", "serve"]


def create_app(models: _Models, config: ServerConfig | None = None) -> Starlette:
    """Builds the ASGI app around one or several loaded models (an ``Encoder``, ``SequenceClassifier``,
    ``TokenClassifier``, ``QuestionAnswerer``, ``MultipleChoice`` or ``FillMask``, a list, or a ``{name: model}``
    mapping); run it with any ASGI server (see ``app.create_app``).

    Raises:
        ImportError: the server extra is not installed.
    """
    from .app import create_app as build

    return build(models, config)


def serve(models: _Models, config: ServerConfig | None = None) -> None:
    """Serves ``models`` (as ``create_app`` takes them) over HTTP until interrupted (see ``app.serve``).

    Raises:
        ImportError: the server extra is not installed.
        OSError: the address cannot be bound.
    """
    from .app import serve as run

    run(models, config)
