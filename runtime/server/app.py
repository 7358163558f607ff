"""The HTTP app: routes, error handling and the uvicorn runner (needs the ``server`` extra).

Routes: ``POST /v1/embeddings`` (OpenAI's request and response shape), ``GET /health`` (readiness, model,
limits and counters), ``GET /v1/models``. Concurrent requests are merged and run one model call at a time
(micro-batching); a request that times out or whose client leaves stops costing model time.

A route is an ``async (request) -> Response`` method of ``_Service`` wrapped by ``guards.guarded``; one that runs
the model reads its body with the guards and submits work to the service's batcher.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..encoder import Encoder
from ..postprocess import truncate_dimensions
from ..utils import require_extra
from .config import ServerConfig
from .microbatch import BatcherClosedError, MicroBatcher, QueueFullError
from .openai_api import ApiError, embedding_response, parse_embedding_request

require_extra("server", "deberta_onnx.runtime.server")

from starlette.applications import Starlette  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from .guards import (  # noqa: E402
    ClientGone,
    HostCheck,
    answer_or_leave,
    error_response,
    guarded,
    internal_error,
    read_body,
    require_json,
)
from .runner import run_uvicorn  # noqa: E402

__all__ = ["create_app", "serve"]

# Above this many floats a JSON body is serialised in a worker thread, so that one large response does not hold
# the event loop (and every other request) while it is written.
_LARGE_RESPONSE_FLOATS = 100_000


class _Service:
    """The routes' state: one encoder, one batcher, the config, and whether the server takes requests."""

    def __init__(self, encoder: Encoder, config: ServerConfig) -> None:
        self.encoder = encoder
        self.config = config
        self.model_name = config.model_name or encoder.model_dir.name
        self.provider = encoder.session.get_providers()[0]
        self.batcher = MicroBatcher(
            lambda texts: encoder.plan(texts, config.batch_size),
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
        )
        self.status = "starting"  # then "ok", "draining" (SIGTERM: in-flight requests finish), "stopped"
        self.reading = 0  # requests whose body is still arriving

    def start_draining(self) -> None:
        """Takes no more work: ``/health`` and new requests get 503, what is queued runs at once."""
        if self.status == "ok":
            self.status = "draining"
            self.batcher.drain()

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.batcher.start()
        self.status = "ok"
        try:
            yield
        finally:
            self.status = "stopped"
            await self.batcher.close()

    async def embeddings(self, request: Request) -> Response:
        config = self.config
        self._check_open()
        require_json(request)
        stats = self.batcher.stats
        self.reading += 1
        try:
            body = await read_body(request, limit=config.max_request_bytes, timeout_s=config.read_timeout_s)
        except ClientGone:
            stats.disconnected += 1
            raise
        finally:
            self.reading -= 1
        parsed = parse_embedding_request(body, max_inputs=config.max_inputs, hidden_size=self.encoder.hidden_size)
        self._check_open()
        try:
            vectors, counts = await answer_or_leave(request, self.batcher.submit(parsed.texts), config.timeout_s)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), type="overloaded_error", code="queue_full") from exc
        except BatcherClosedError as exc:
            raise _shutting_down() from exc
        except ClientGone:
            stats.disconnected += 1
            raise
        except asyncio.TimeoutError as exc:
            stats.timed_out += 1
            raise ApiError(
                504, f"no vectors within the server's timeout of {config.timeout_s:g} s for "
                     f"{len(parsed.texts)} texts; retry later or send fewer texts per request",
                type="timeout_error", code="timeout",
            ) from exc
        except Exception as exc:  # the model call failed; the batcher logged it
            raise internal_error() from exc
        vectors = truncate_dimensions(vectors, parsed.dimensions, normalize=config.normalize,
                                      graph_normalizes=self.encoder.manifest.normalize)
        payload = embedding_response(vectors, token_counts=counts, encoding_format=parsed.encoding_format,
                                     model=parsed.model or self.model_name)
        if parsed.encoding_format == "float" and vectors.size > _LARGE_RESPONSE_FLOATS:
            return Response(await run_in_threadpool(_dumps, payload), media_type="application/json")
        return Response(_dumps(payload), media_type="application/json")

    def _check_open(self) -> None:
        if self.status != "ok":
            raise _shutting_down()

    async def health(self, request: Request) -> Response:
        config = self.config
        body = {
            "status": self.status,
            "model": self.model_name,
            "model_dir": str(self.encoder.model_dir),
            "precision": self.encoder.precision,
            "provider": self.provider,
            "hidden_size": self.encoder.hidden_size,
            "max_length": self.encoder.max_length,
            "normalize": config.normalize,
            "limits": {name: getattr(config, name) for name in (
                "max_batch_size", "batch_size", "max_wait_ms", "max_queue", "max_request_bytes", "max_inputs",
                "timeout_s", "read_timeout_s", "keep_alive_s", "max_connections", "shutdown_timeout_s")},
            "queue": {"texts": self.batcher.queued_texts, "requests": self.batcher.queued_requests,
                      "running": self.batcher.running_requests, "reading": self.reading},
            "stats": self.batcher.stats.as_dict(),
        }
        return JSONResponse(body, status_code=200 if self.status == "ok" else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "deberta-onnx"},
        ]})


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another instance", type="unavailable_error",
                    code="shutting_down")


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = f"no route {request.url.path}; this server has POST /v1/embeddings, GET /health, GET /v1/models"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))
    response.headers.update(exc.headers or {})
    return response


def _build(encoder: Encoder, config: ServerConfig) -> tuple[Starlette, _Service]:
    service = _Service(encoder, config)
    routes = [
        Route("/v1/embeddings", guarded(service.embeddings), methods=["POST"]),
        Route("/health", guarded(service.health), methods=["GET"]),
        Route("/v1/models", guarded(service.models), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: _http_error},  # type: ignore[dict-item]
                    middleware=[Middleware(HostCheck, host=config.host, allowed=config.allowed_hosts)])
    return app, service


def create_app(encoder: Encoder, config: ServerConfig | None = None) -> Starlette:
    """Builds the ASGI app around one ``Encoder``; run it with any ASGI server.

    Args:
        encoder: the loaded model. Only the batcher's single worker thread calls it.
        config: limits and batching; ``port``, ``access_log``, the connection limits and the shutdown deadline
            are used by ``serve`` only (another ASGI server has its own).

    Returns:
        A Starlette app whose lifespan starts and stops the micro-batcher.
    """
    return _build(encoder, config or ServerConfig())[0]


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                                 "(0 takes a free one) or --host") from exc


def serve(encoder: Encoder, config: ServerConfig | None = None) -> None:
    """Serves ``encoder`` over HTTP until SIGTERM or Ctrl+C, then drains: requests in flight are answered (new
    ones and ``/health`` get 503) for up to ``shutdown_timeout_s``, and the call returns.

    Prints one line to stderr once the port is bound: ``deberta-onnx: serving MODEL ... on http://HOST:PORT``.

    Raises:
        OSError: the address cannot be bound (port in use, not a local address).
    """
    config = config or ServerConfig()
    app, service = _build(encoder, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"deberta-onnx: serving {service.model_name} ({encoder.precision}, {service.provider}) on "
          f"http://{shown}:{port}", file=sys.stderr, flush=True)
    try:
        run_uvicorn(app, service, config, sock)
    finally:
        sock.close()
