"""The HTTP app: routes, error handling and the uvicorn launch (needs the ``server`` extra).

Routes: ``POST /v1/embeddings`` (OpenAI's request and response shape), ``POST /v1/rerank`` (Cohere's and Jina's),
``POST /v1/classify``, each served by the models of the task that has it (``models.ROUTES``); ``GET /health``
(readiness, models, limits and counters), ``GET /v1/models``, ``GET /metrics`` (Prometheus). Several model
folders may be served at once, routed by the request's ``model``. Concurrent requests for one model are merged
and run one model call at a time (micro-batching); a request that times out or whose client leaves stops costing
model time.

A route is an ``async (request) -> Response`` method of ``_Service`` wrapped by ``guards.guarded``; one that runs
a model reads its body with the guards, picks the model, and submits work to that model's batcher.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from ..installed import require_extra
from .config import ServerConfig
from .errors import ApiError
from .microbatch import BatcherClosedError, QueueFullError
from .models import (
    CLASSIFY,
    EMBEDDINGS,
    FILL_MASK,
    MULTIPLE_CHOICE,
    QUESTION_ANSWERING,
    RERANK,
    Job,
    Model,
    ServedModel,
)
from .openai_api import check_model, read_object

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
    CloseUnread,
    HostCheck,
    answer_or_leave,
    error_response,
    guarded,
    internal_error,
    read_body,
    require_json,
)
from .launch import run_uvicorn  # noqa: E402
from .metrics import ModelObserver, RequestMetrics, ServerMetrics  # noqa: E402

__all__ = ["create_app", "serve"]

MODEL_ROUTES = (EMBEDDINGS, RERANK, CLASSIFY, QUESTION_ANSWERING, MULTIPLE_CHOICE, FILL_MASK)


class _Service:
    """The routes' state: the served models (each with its batcher), the metrics, the config, and whether the
    server takes requests."""

    def __init__(self, models: dict[str, Model], config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(routes=[*MODEL_ROUTES, "/health", "/v1/models", "/metrics"])
        self.models: list[ServedModel] = []
        self.by_name: dict[str, ServedModel] = {}
        for name, model in models.items():
            served = ServedModel(model, name, config, ModelObserver(self.metrics, name))
            self.models.append(served)
            self.metrics.add_model(name, task=served.task, precision=model.precision, provider=served.provider)
            batcher = served.batcher
            self.metrics.track_queue(name, texts=partial(getattr, batcher, "queued_texts"),
                                     requests=partial(getattr, batcher, "queued_requests"))
            for key in (name, model.model_dir.name):
                self.by_name.setdefault(key, served)
        self.status = "starting"  # then "ok", "draining" (SIGTERM: in-flight requests finish), "stopped"
        self.reading = 0  # requests whose body is still arriving

    def start_draining(self) -> None:
        """Takes no more work: ``/health`` and new requests get 503, what is queued runs at once."""
        if self.status == "ok":
            self.status = "draining"
            for served in self.models:
                served.batcher.drain()

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        for served in self.models:
            served.batcher.start()
        self.status = "ok"
        try:
            yield
        finally:
            self.status = "stopped"
            for served in self.models:
                await served.batcher.close()

    def route(self, path: str) -> Callable[[Request], Awaitable[Response]]:
        """The handler of a model route (``/v1/embeddings``, ``/v1/rerank``, ``/v1/classify``)."""

        async def handle(request: Request) -> Response:
            try:
                return await self._run(path, request)
            except ApiError as error:
                if error.status in (408, 413, 429, 503):
                    self.metrics.observe_rejection(error.code or str(error.status))
                raise

        handle.__name__ = path.rsplit("/", 1)[-1]
        return handle

    async def _run(self, path: str, request: Request) -> Response:
        config = self.config
        self._check_open()
        require_json(request)
        self.reading += 1
        try:
            body = await read_body(request, limit=config.max_request_bytes, timeout_s=config.read_timeout_s)
        except ClientGone:
            self._count_disconnect()
            raise
        finally:
            self.reading -= 1
        served = self._pick(path, body)
        job = served.job(path, body, echo=len(self.models) == 1)
        self._check_open()
        batcher = served.batcher
        try:
            lengths = None
            if batcher.budget is not None:
                lengths = await run_in_threadpool(served.token_counts, job.items)
            outputs, counts = await answer_or_leave(request, batcher.submit(job.items, lengths), config.timeout_s)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), type="overloaded_error", code="queue_full") from exc
        except BatcherClosedError as exc:
            raise _shutting_down() from exc
        except ClientGone:
            batcher.stats.disconnected += 1
            raise
        except asyncio.TimeoutError as exc:
            batcher.stats.timed_out += 1
            self.metrics.observe_timeout(served.name)
            raise ApiError(
                504, f"no answer within the server's timeout of {config.timeout_s:g} s for "
                     f"{len(job.items)} inputs; retry later or send fewer inputs per request",
                type="timeout_error", code="timeout",
            ) from exc
        except Exception as exc:  # the model call failed; the batcher logged it
            raise internal_error() from exc
        # Answers are built and serialised in a worker thread, never on the event loop: a token classifier's
        # spans of 2,048 long texts, or a large float body, would hold every other request (and /health) meanwhile.
        return Response(await run_in_threadpool(_answer, job, outputs, counts), media_type="application/json")

    def _pick(self, path: str, body: bytes) -> ServedModel:
        """The model a request goes to: the only one served, else the one its ``model`` field names, else the
        only one serving ``path``."""
        if len(self.models) == 1:
            served = self.models[0]
        else:
            requested = _requested_model(body)
            if requested is None:
                candidates = [m for m in self.models if path in m.routes]
                if len(candidates) != 1:
                    raise ApiError(400, f"this server serves several models; name one in the 'model' field: "
                                        f"{self._names(path)}", param="model", code="model_required")
                served = candidates[0]
            elif requested in self.by_name:
                served = self.by_name[requested]
            else:
                raise ApiError(404, f"model {requested!r} is not served here; the models served are "
                                    f"{self._names(None)}", param="model", code="model_not_found")
        if path not in served.routes:
            raise ApiError(400, f"model {served.name!r} is a {served.task} model, served on "
                                f"{', '.join(served.routes)}; {path} is served for {self._names(path)}",
                           param="model", code="unsupported_task")
        return served

    def _names(self, path: str | None) -> str:
        names = [m.name for m in self.models if path is None or path in m.routes]
        return ", ".join(map(repr, names)) if names else "no model of this server"

    def _count_disconnect(self) -> None:
        if self.models:
            self.models[0].batcher.stats.disconnected += 1

    def _check_open(self) -> None:
        if self.status != "ok":
            raise _shutting_down()

    async def health(self, request: Request) -> Response:
        config = self.config
        first = self.models[0]
        body: dict[str, Any] = {
            "status": self.status,
            **first.describe(),
            "normalize": config.normalize,
            "limits": {name: getattr(config, name) for name in (
                "max_batch_size", "max_batch_tokens", "max_call_tokens", "batch_size", "max_wait_ms", "max_queue",
                "max_request_bytes",
                "max_inputs", "timeout_s", "read_timeout_s", "keep_alive_s", "max_connections",
                "shutdown_timeout_s")},
            "queue": {"texts": sum(m.batcher.queued_texts for m in self.models),
                      "requests": sum(m.batcher.queued_requests for m in self.models),
                      "running": sum(m.batcher.running_requests for m in self.models), "reading": self.reading},
            "stats": _sum_stats([m.batcher.stats.as_dict() for m in self.models]),
            "models": [{**m.describe(), "stats": m.batcher.stats.as_dict()} for m in self.models],
        }
        return JSONResponse(body, status_code=200 if self.status == "ok" else 503)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "deberta-onnx", "task": m.task,
             "routes": list(m.routes)} for m in self.models
        ]})

    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})


def _requested_model(body: bytes) -> str | None:
    """The ``model`` field of a JSON object body (``None`` when absent).

    Raises:
        ApiError: 400 ``invalid_json`` for a body that is not a JSON object (as the route's own parser would say
            on a server of one model), or 400 naming ``model`` when it is not a string of valid Unicode.
    """
    return check_model(read_object(body, example='{"model": "...", ...}'))


def _sum_stats(stats: list[dict[str, int]]) -> dict[str, int]:
    total = {name: sum(s[name] for s in stats) for name in stats[0]}
    total["largest_batch"] = max(s["largest_batch"] for s in stats)
    return total


def _answer(job: Job, outputs: Any, counts: list[int]) -> bytes:
    return _dumps(job.answer(outputs, counts))


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another instance", type="unavailable_error",
                    code="shutting_down")


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = (f"no route {request.url.path}; this server has POST {', '.join(MODEL_ROUTES)} (as its models' "
                   "tasks allow), GET /health, GET /v1/models, GET /metrics")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))
    response.headers.update(exc.headers or {})
    return response


def _named(models: Model | Sequence[Model] | Mapping[str, Model], config: ServerConfig) -> dict[str, Model]:
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        listed = list(models) if isinstance(models, Sequence) else [models]
        if len(listed) == 1:
            named = {config.model_name or listed[0].model_dir.name: listed[0]}
        else:
            if config.model_name is not None:
                raise ValueError("model_name names the model of a one-model server; with several models each is "
                                 "named after its folder (pass a {name: model} mapping to name them)")
            named = {}
            for model in listed:
                name = model.model_dir.name
                if name in named:
                    raise ValueError(f"two model folders are named {name!r} ({named[name].model_dir} and "
                                     f"{model.model_dir}); the server routes by folder name, so rename one")
                named[name] = model
    if not named:
        raise ValueError("the server needs at least one model")
    return named


def _build(models: Model | Sequence[Model] | Mapping[str, Model], config: ServerConfig
           ) -> tuple[Starlette, _Service]:
    service = _Service(_named(models, config), config)
    routes = [Route(path, guarded(service.route(path)), methods=["POST"]) for path in MODEL_ROUTES]
    routes += [
        Route("/health", guarded(service.health), methods=["GET"]),
        Route("/v1/models", guarded(service.list_models), methods=["GET"]),
        Route("/metrics", guarded(service.prometheus), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: _http_error},  # type: ignore[dict-item]
                    middleware=[Middleware(CloseUnread), Middleware(RequestMetrics, metrics=service.metrics),
                                Middleware(HostCheck, host=config.host, allowed=config.allowed_hosts)])
    return app, service


def create_app(models: Model | Sequence[Model] | Mapping[str, Model], config: ServerConfig | None = None
               ) -> Starlette:
    """Builds the ASGI app around one or several loaded models; run it with any ASGI server.

    Args:
        models: an ``Encoder``, ``SequenceClassifier`` or ``TokenClassifier`` (``models.load_folder`` loads a
            folder with the right one), a list of them (named after their folders), or a ``{name: model}``
            mapping. Only each model's batcher worker thread calls it.
        config: limits and batching; ``port``, ``access_log``, the connection limits and the shutdown deadline
            are used by ``serve`` only (another ASGI server has its own).

    Returns:
        A Starlette app whose lifespan starts and stops the micro-batchers.

    Raises:
        ValueError: no model, two folders of one name, or ``config.model_name`` with several models.
    """
    return _build(models, config or ServerConfig())[0]


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                                 "(0 takes a free one) or --host") from exc


def serve(models: Model | Sequence[Model] | Mapping[str, Model], config: ServerConfig | None = None) -> None:
    """Serves ``models`` (as ``create_app`` takes them) over HTTP until SIGTERM or Ctrl+C, then drains: requests
    in flight are answered (new ones and ``/health`` get 503) for up to ``shutdown_timeout_s``, and the call
    returns.

    Prints one line to stderr once the port is bound: ``deberta-onnx: serving MODEL (...), ... on
    http://HOST:PORT``.

    Raises:
        OSError: the address cannot be bound (port in use, not a local address).
        ValueError: as ``create_app``.
    """
    config = config or ServerConfig()
    app, service = _build(models, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    served = ", ".join(f"{m.name} ({m.task}, {m.model.precision}, {m.provider})" for m in service.models)
    print(f"deberta-onnx: serving {served} on http://{shown}:{port}", file=sys.stderr, flush=True)
    try:
        run_uvicorn(app, service, config, sock)
    finally:
        sock.close()
