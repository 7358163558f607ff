"""A Ray Serve deployment of an exported model folder, with the HTTP API of ``deberta-onnx serve``.

    serve run deberta_onnx.runtime.ray.serve:app model_dir=models/deberta-v3-base num_replicas=2 threads=1

or from Python::

    from ray import serve
    from deberta_onnx.runtime.ray import deployment
    serve.run(deployment("models/deberta-v3-base", num_replicas=2), route_prefix="/")

Each replica is a Ray actor holding its own model (an ``Encoder``, ``SequenceClassifier``, ``TokenClassifier``,
``QuestionAnswerer``, ``MultipleChoice`` or ``FillMask``, as the folder's task says: ``server.models.load_folder``;
one ONNX Runtime session of ``threads`` threads, on ``threads`` Ray CPUs) and serves the app of
``deberta_onnx.runtime.server.create_app`` as its ASGI ingress: the same routes, errors, limits and micro-batcher as
``deberta-onnx serve``, so whatever that app serves, the deployment serves too. Ray Serve's proxy spreads requests
over the replicas; each replica merges the requests it gets (the project's micro-batcher; ``benchmarks/ray_serve.py``
compares it with Ray Serve's own
``@serve.batch`` on the same replicas).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from ..checks import check_positive_int
from ..config import EncoderConfig
from ..heap import fix_mmap_threshold
from ..server import ServerConfig, create_app
from ..server.models import load_folder

__all__ = ["DebertaServer", "app", "deployment"]


@serve.ingress()
class DebertaServer:
    """One replica: loads the folder, then hands Ray Serve the server app (``__serve_build_asgi_app__``)."""

    def __init__(self, model_dir: str, server_config: ServerConfig, encoder_config: EncoderConfig) -> None:
        if encoder_config.arena_shrink_tokens is not None:
            fix_mmap_threshold()  # a replica's process is its own, as the server's is: what a burst freed goes back
        self.model = load_folder(model_dir, encoder_config)
        self.server_config = server_config

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.model, self.server_config)


def deployment(model_dir: str | Path, *, num_replicas: int = 1, threads: int = 1,
               server_config: ServerConfig | None = None, encoder_config: EncoderConfig | None = None,
               name: str = "deberta-onnx", max_ongoing_requests: int = 256) -> Application:
    """The bound deployment, ready for ``serve.run``.

    Args:
        model_dir: an exported model folder, readable at the same path on every node that runs a replica.
        num_replicas: replicas (Ray actors), each with its own session.
        threads: ONNX Runtime threads, and Ray CPUs, per replica.
        server_config: batching and limits of each replica's app (``host``/``port`` are Ray Serve's: set them
            with ``serve.start(http_options=...)`` or ``serve run --host/--port``); ``model_name`` defaults to
            the folder's name.
        encoder_config: loading options; ``intra_op_threads`` is set from ``threads``.
        name: the deployment's name.
        max_ongoing_requests: requests Ray Serve lets into one replica at once; the app's own queue
            (``server_config.max_queue``) and 429s apply inside it, so keep this at least the expected
            concurrency divided by the replicas.

    Raises:
        ValueError: a bad count, or ``model_dir`` is not a folder.
    """
    check_positive_int("num_replicas", num_replicas)
    check_positive_int("threads", threads)
    check_positive_int("max_ongoing_requests", max_ongoing_requests)
    folder = Path(model_dir).resolve()
    if not folder.is_dir():
        raise ValueError(f"{model_dir} is not a folder; pass a folder written by `deberta-onnx export`")
    config = server_config or ServerConfig()
    if config.model_name is None:
        config = dataclasses.replace(config, model_name=folder.name)
    loading = dataclasses.replace(encoder_config or EncoderConfig(), intra_op_threads=threads)
    options = serve.deployment(name=name, num_replicas=num_replicas, ray_actor_options={"num_cpus": threads},
                               max_ongoing_requests=max_ongoing_requests)
    return options(DebertaServer).bind(str(folder), config, loading)


_INT_ARGS = ("num_replicas", "threads", "max_ongoing_requests")


def app(args: dict[str, str]) -> Application:
    """The application builder of ``serve run deberta_onnx.runtime.ray.serve:app model_dir=DIR [key=value ...]``.

    Keys: ``model_dir`` (required), ``num_replicas``, ``threads``, ``max_ongoing_requests``, ``name``, and any
    ``ServerConfig`` field (``max_batch_size=32``, ``max_wait_ms=5``, ``normalize=false``, ...).

    Raises:
        ValueError: ``model_dir`` missing, or an unknown key or bad value (the message lists the keys).
    """
    values = dict(args)
    if "model_dir" not in values:
        raise ValueError("model_dir=DIR is required: serve run deberta_onnx.runtime.ray.serve:app model_dir=DIR")
    model_dir = values.pop("model_dir")
    kwargs: dict[str, Any] = {k: int(values.pop(k)) for k in _INT_ARGS if k in values}
    if "name" in values:
        kwargs["name"] = values.pop("name")
    server_fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(values) - set(server_fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; accepted: model_dir, {', '.join(_INT_ARGS)}, "
                         f"name, and the ServerConfig fields {', '.join(server_fields)}")
    defaults = ServerConfig()
    server: dict[str, Any] = {name: _convert(value, getattr(defaults, name), name) for name, value in values.items()}
    return deployment(model_dir, server_config=ServerConfig(**server), **kwargs)


def _convert(value: str, default: object, name: str) -> object:
    """``value`` (a ``key=value`` string) as the type of the field's default."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value
