"""An OpenAI-compatible embeddings server on Starlette + uvicorn.

    deberta-onnx serve models/deberta-v3-base --port 8000

or from Python::

    from deberta_onnx.runtime import Encoder
    from deberta_onnx.runtime.server import ServerConfig, serve
    serve(Encoder("models/deberta-v3-base"), ServerConfig(port=8000))

``ServerConfig`` needs only the standard library; ``create_app`` and ``serve`` need the ``server`` extra
(``pip install 'deberta-onnx[server]'``) and say so when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ServerConfig

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..encoder import Encoder

__all__ = ["ServerConfig", "create_app", "serve"]


def create_app(encoder: Encoder, config: ServerConfig | None = None) -> Starlette:
    """Builds the ASGI app around one ``Encoder``; run it with any ASGI server (see ``app.create_app``).

    Raises:
        ImportError: the server extra is not installed.
    """
    from .app import create_app as build

    return build(encoder, config)


def serve(encoder: Encoder, config: ServerConfig | None = None) -> None:
    """Serves ``encoder`` over HTTP until interrupted (see ``app.serve``).

    Raises:
        ImportError: the server extra is not installed.
        OSError: the address cannot be bound.
    """
    from .app import serve as run

    run(encoder, config)
