"""Scale-out on Ray (needs the ``ray`` extra: ``pip install 'deberta-onnx[ray]'``).

- ``embed_corpus`` / ``embed_dataset`` (``data.py``): offline embedding with Ray Data through an actor pool of
  ``Encoder``s sized to the cluster; a folder of shards resumes where a killed run stopped.
- ``deployment`` / ``app`` (``serve.py``): a Ray Serve deployment with the HTTP API of ``deberta-onnx serve``.

Nothing else in the package imports ray; this package checks the extra on import and names it when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..installed import require_extra

require_extra("ray", "deberta_onnx.runtime.ray")

if TYPE_CHECKING:
    from .data import EmbedReport, embed_corpus, embed_dataset
    from .serve import app, deployment

__all__ = ["EmbedReport", "app", "deployment", "embed_corpus", "embed_dataset"]

_MODULES = {"EmbedReport": "data", "embed_corpus": "data", "embed_dataset": "data", "app": "serve",
            "deployment": "serve"}


def __getattr__(name: str) -> Any:
    # Ray Data and Ray Serve each take a second or more to import: load only the one asked for.
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
