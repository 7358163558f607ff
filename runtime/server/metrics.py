"""Prometheus metrics of one server app, on a registry of its own (``prometheus_client``, in the server extra).

The app and the batcher call ``ServerMetrics``' methods; ``GET /metrics`` answers with ``render``. Nothing here
touches the process-wide default registry, so several apps (tests, several models) never collide. Names start
with ``deberta_onnx_``; the process's memory, CPU and open files come from prometheus_client's own collectors.

    metrics = ServerMetrics(routes=["/v1/embeddings", "/health"])
    metrics.add_model("xsmall", task="embedding", precision="fp32", provider="CPUExecutionProvider")
    metrics.track_queue("xsmall", texts=lambda: batcher.queued_texts, requests=lambda: batcher.queued_requests)
    metrics.observe_request("/v1/embeddings", 200, seconds=0.012)
    metrics.observe_batch("xsmall", requests=3, texts=7, tokens=180, padded_tokens=224, seconds=0.009)
    body, content_type = metrics.render(request.headers.get("accept"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..installed import require_extra

require_extra("server", "deberta_onnx.runtime.server.metrics")

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder  # noqa: E402

__all__ = ["LATENCY_BUCKETS", "SIZE_BUCKETS", "TOKEN_BUCKETS", "UNMATCHED_ROUTE", "ModelObserver", "RequestMetrics",
           "ServerMetrics"]

NAMESPACE = "deberta_onnx"
# Seconds, from a cached short request on a fast machine to a large request on 2 slow cores.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Texts or requests per model call: powers of two up to a large GPU batch.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Tokens per model call: one short text to 256 rows of 512 tokens.
TOKEN_BUCKETS = tuple(float(2**n) for n in range(4, 18))
_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)
# The route label of requests that matched no route (scans of random paths must not grow the label set).
UNMATCHED_ROUTE = "unmatched"


class ServerMetrics:
    """The server's metrics on a fresh ``CollectorRegistry``.

    Args:
        routes: the route paths the app serves (their templates, e.g. ``/v1/embeddings``); any other path is
            counted as ``UNMATCHED_ROUTE``.
        process: also export the process's memory, CPU time and file descriptors, and the Python version.

    Metrics (all prefixed ``deberta_onnx_``):
        ``requests_total{route,status}``, ``request_duration_seconds{route}``: every HTTP request answered.
        ``queue_texts{model}``, ``queue_requests{model}``: what waits for the model, read at scrape time.
        ``queue_wait_seconds{model}``: from a request's arrival to the start of its model call.
        ``batch_requests{model}``, ``batch_texts{model}``, ``batch_tokens{model}``, ``batch_padded_tokens{model}``,
        ``model_call_seconds{model}``: per merged model call (tokens as the model sees them, padded tokens as it
        runs them: their ratio is the padding overhead).
        ``rejections_total{model,reason}``: requests refused before the model (``queue_full``,
        ``too_many_inputs``, ``request_too_large``, ``shutting_down``, ...).
        ``timeouts_total{model}``: requests answered 504. ``failures_total{model}``: model calls that raised.
        ``model_info{model,task,precision,provider}``: 1 per served model.
    """

    def __init__(self, routes: Iterable[str] = (), *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes = frozenset(routes)
        add = self._add
        self._requests = add(Counter, "requests", "HTTP requests answered, by route and status code.",
                             ("route", "status"))
        self._latency = add(Histogram, "request_duration_seconds", "Time from a request's arrival to its answer.",
                            ("route",), buckets=LATENCY_BUCKETS)
        self._queue_texts = add(Gauge, "queue_texts", "Texts queued for the model (not counting the running call).",
                                ("model",))
        self._queue_requests = add(Gauge, "queue_requests", "Requests queued for the model.", ("model",))
        self._queue_wait = add(Histogram, "queue_wait_seconds", "Time from a request's arrival to its model call.",
                               ("model",), buckets=LATENCY_BUCKETS)
        self._batch_requests = add(Histogram, "batch_requests", "Requests merged into one model call.", ("model",),
                                   buckets=SIZE_BUCKETS)
        self._batch_texts = add(Histogram, "batch_texts", "Texts in one model call.", ("model",),
                                buckets=SIZE_BUCKETS)
        self._batch_tokens = add(Histogram, "batch_tokens", "Tokens in one model call, padding excluded.",
                                 ("model",), buckets=TOKEN_BUCKETS)
        self._batch_padded = add(Histogram, "batch_padded_tokens", "Token positions one model call runs, padding "
                                 "included.", ("model",), buckets=TOKEN_BUCKETS)
        self._call_seconds = add(Histogram, "model_call_seconds", "Duration of one merged model call.", ("model",),
                                 buckets=LATENCY_BUCKETS)
        self._rejections = add(Counter, "rejections", "Requests refused before reaching the model, by reason.",
                               ("model", "reason"))
        self._timeouts = add(Counter, "timeouts", "Requests answered 504: no result within the server's timeout.",
                             ("model",))
        self._failures = add(Counter, "failures", "Model calls that raised.", ("model",))
        self._info = add(Gauge, "model_info", "1 per served model, with its task, precision and execution provider.",
                         ("model", "task", "precision", "provider"))
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def _add(self, kind: type[_Metric], name: str, documentation: str, labels: tuple[str, ...], **extra: Any
             ) -> _Metric:
        return kind(name, documentation, labels, namespace=NAMESPACE, registry=self.registry, **extra)

    def route_label(self, route: str | None) -> str:
        """``route`` if the app serves it, else ``UNMATCHED_ROUTE``."""
        return route if route in self.routes else UNMATCHED_ROUTE

    def add_model(self, model: str, *, task: str, precision: str, provider: str) -> None:
        """Declares a served model: sets ``model_info`` and creates its per-model series at zero, so that
        rates and ratios exist before the first request."""
        self._info.labels(model, task, precision, provider).set(1)
        for metric in (self._queue_wait, self._batch_requests, self._batch_texts, self._batch_tokens,
                       self._batch_padded, self._call_seconds, self._timeouts, self._failures):
            metric.labels(model)

    def track_queue(self, model: str, *, texts: Callable[[], float], requests: Callable[[], float]) -> None:
        """Reads the queue depth of ``model`` from these callables at each scrape (nothing to update per
        request). They run on the scraping thread: read plain attributes only."""
        self._queue_texts.labels(model).set_function(texts)
        self._queue_requests.labels(model).set_function(requests)

    def observe_request(self, route: str | None, status: int, *, seconds: float) -> None:
        """One answered HTTP request: its route template (``None`` or an unknown one counts as unmatched), its
        status code and how long it took."""
        label = self.route_label(route)
        self._requests.labels(label, str(status)).inc()
        self._latency.labels(label).observe(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """A request left the queue for a model call after waiting ``seconds``."""
        self._queue_wait.labels(model).observe(seconds)

    def observe_batch(self, model: str, *, requests: int, texts: int, tokens: int, padded_tokens: int,
                      seconds: float) -> None:
        """One merged model call: how many requests and texts it merged, their tokens (padding excluded and
        included; ``batching.padded_tokens`` gives the second) and how long it ran."""
        self._batch_requests.labels(model).observe(requests)
        self._batch_texts.labels(model).observe(texts)
        self._batch_tokens.labels(model).observe(tokens)
        self._batch_padded.labels(model).observe(padded_tokens)
        self._call_seconds.labels(model).observe(seconds)

    def observe_rejection(self, reason: str, model: str = "") -> None:
        """A request refused before the model (``model`` empty when none was resolved yet)."""
        self._rejections.labels(model, reason).inc()

    def observe_timeout(self, model: str) -> None:
        """A request answered 504."""
        self._timeouts.labels(model).inc()

    def observe_failure(self, model: str) -> None:
        """A model call raised."""
        self._failures.labels(model).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text and its content type: Prometheus' text format, or OpenMetrics when ``accept``
        (the request's ``Accept`` header) asks for it, as Prometheus' scraper does."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class ModelObserver:
    """The batcher's reports of one model (``microbatch.BatchObserver``) turned into ``ServerMetrics``."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model

    def queue_wait(self, seconds: float) -> None:
        self.metrics.observe_queue_wait(self.model, seconds)

    def model_call(self, call: Any, *, requests: int, seconds: float) -> None:
        self.metrics.observe_batch(self.model, requests=requests, texts=len(call.rows),
                                   tokens=int(sum(call.token_counts)), padded_tokens=int(call.padded_tokens),
                                   seconds=seconds)

    def failure(self) -> None:
        self.metrics.observe_failure(self.model)


class RequestMetrics:
    """ASGI middleware: every HTTP request answered, by route and status, and its duration (a client that left
    before its answer counts as status 499)."""

    def __init__(self, app: Any, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 499

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            self.metrics.observe_request(scope.get("path"), status, seconds=time.perf_counter() - start)
