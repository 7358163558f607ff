"""The HTTP app: routes, error handlers and the uvicorn runner (needs the ``server`` extra).

Routes: ``POST /v1/embeddings`` (OpenAI's request and response shape), ``GET /health`` (readiness, model,
limits and counters), ``GET /v1/models``. Concurrent requests are merged into one model call (micro-batching).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from ..encoder import Encoder
from ..postprocess import truncate_dimensions
from ..utils import require_extra
from .config import ServerConfig
from .microbatch import BatcherClosedError, MicroBatcher, QueueFullError
from .openai_api import ApiError, embedding_response, parse_embedding_request

require_extra("server", "deberta_onnx.runtime.server")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

__all__ = ["create_app", "serve"]

# Above this many floats a JSON body is serialised in a worker thread, so that one large response does not hold
# the event loop (and every other request) while it is written.
_LARGE_RESPONSE_FLOATS = 100_000


class _Service:
    """The routes' state: one encoder, one batcher, the config."""

    def __init__(self, encoder: Encoder, config: ServerConfig) -> None:
        self.encoder = encoder
        self.config = config
        self.model_name = config.model_name or encoder.model_dir.name
        self.provider = encoder.session.get_providers()[0]
        self.batcher = MicroBatcher(
            self._encode,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
        )
        self.running = False

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        # Runs in the batcher's worker thread. Token counts (for `usage`) come from a separate tokenizer pass;
        # vectors are left unnormalised here because `dimensions` truncation, per request, comes first.
        counts = self.encoder.token_count(texts)
        vectors = self.encoder.encode(texts, batch_size=self.config.batch_size)
        return vectors, counts

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.batcher.start()
        self.running = True
        try:
            yield
        finally:
            self.running = False
            await self.batcher.close()

    async def embeddings(self, request: Request) -> Response:
        body = await _read_body(request, self.config.max_request_bytes)
        parsed = parse_embedding_request(body, max_inputs=self.config.max_inputs,
                                         hidden_size=self.encoder.hidden_size)
        try:
            vectors, counts = await asyncio.wait_for(self.batcher.submit(parsed.texts), self.config.timeout_s)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), type="overloaded_error", code="queue_full") from exc
        except BatcherClosedError as exc:
            raise ApiError(503, f"{exc}; retry on another instance", type="unavailable_error",
                           code="shutting_down") from exc
        except asyncio.TimeoutError as exc:
            self.batcher.stats.timed_out += 1
            raise ApiError(
                504, f"no vectors within the server's timeout of {self.config.timeout_s:g} s for "
                     f"{len(parsed.texts)} texts; retry later or send fewer texts per request",
                type="timeout_error", code="timeout",
            ) from exc
        vectors = truncate_dimensions(vectors, parsed.dimensions, normalize=self.config.normalize,
                                      graph_normalizes=self.encoder.manifest.normalize)
        payload = embedding_response(vectors, token_counts=counts, encoding_format=parsed.encoding_format,
                                     model=parsed.model or self.model_name)
        if parsed.encoding_format == "float" and vectors.size > _LARGE_RESPONSE_FLOATS:
            return Response(await run_in_threadpool(_dumps, payload), media_type="application/json")
        return Response(_dumps(payload), media_type="application/json")

    async def health(self, request: Request) -> Response:
        config = self.config
        body = {
            "status": "ok" if self.running else "shutting_down",
            "model": self.model_name,
            "model_dir": str(self.encoder.model_dir),
            "precision": self.encoder.precision,
            "provider": self.provider,
            "hidden_size": self.encoder.hidden_size,
            "max_length": self.encoder.max_length,
            "normalize": config.normalize,
            "limits": {
                "max_batch_size": config.max_batch_size,
                "batch_size": config.batch_size,
                "max_wait_ms": config.max_wait_ms,
                "max_queue": config.max_queue,
                "max_request_bytes": config.max_request_bytes,
                "max_inputs": config.max_inputs,
                "timeout_s": config.timeout_s,
            },
            "queue": {"texts": self.batcher.queued_texts, "requests": self.batcher.queued_requests},
            "stats": self.batcher.stats.as_dict(),
        }
        return JSONResponse(body, status_code=200 if self.running else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "deberta-onnx"},
        ]})


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


async def _read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing with 413 as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared)} bytes declared", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"{size} bytes read so far", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(seen: str, limit: int) -> ApiError:
    return ApiError(413, f"request body is over this server's limit of {limit} bytes ({seen}); send fewer or "
                         "shorter texts per request", code="request_too_large")


async def _api_error(request: Request, exc: ApiError) -> Response:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = f"no route {request.url.path}; this server has POST /v1/embeddings, GET /health, GET /v1/models"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    error = ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


def create_app(encoder: Encoder, config: ServerConfig | None = None) -> Starlette:
    """Builds the ASGI app around one ``Encoder``; run it with any ASGI server.

    Args:
        encoder: the loaded model. Only the batcher's single worker thread calls it.
        config: limits and batching; ``host``, ``port`` and ``access_log`` are used by ``serve`` only.

    Returns:
        A Starlette app whose lifespan starts and stops the micro-batcher.
    """
    service = _Service(encoder, config or ServerConfig())
    routes = [
        Route("/v1/embeddings", service.embeddings, methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, lifespan=service.lifespan, exception_handlers=handlers)  # type: ignore[arg-type]


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                                 "(0 takes a free one) or --host") from exc


def serve(encoder: Encoder, config: ServerConfig | None = None) -> None:
    """Serves ``encoder`` over HTTP until interrupted (Ctrl+C or SIGTERM: in-flight requests finish first).

    Prints one line to stderr once the port is bound: ``deberta-onnx: serving MODEL ... on http://HOST:PORT``.

    Raises:
        OSError: the address cannot be bound (port in use, not a local address).
    """
    config = config or ServerConfig()
    app = create_app(encoder, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"deberta-onnx: serving {config.model_name or encoder.model_dir.name} ({encoder.precision}, "
          f"{encoder.session.get_providers()[0]}) on http://{shown}:{port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", access_log=config.access_log, log_level="info"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
