"""``ServerConfig``: how ``deberta-onnx serve`` listens, batches and limits. Standard library only, so that the
CLI can show its defaults without the server extra installed."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ServerConfig"]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How ``deberta-onnx serve`` listens, batches and limits. CLI flags map one-to-one onto these fields.

    Attributes:
        host: address to listen on; keep the loopback default unless a proxy or firewall fronts the server.
        port: TCP port; 0 picks a free one (printed at start).
        max_batch_size: the most texts merged into one ``Encoder.encode`` call (whole requests are merged).
        batch_size: rows per model run inside that call (``Encoder.encode``'s ``batch_size``): the merged
            texts are sorted by length and run in groups of this many, so little padding is computed.
        max_batch_tokens: a budget of padded token positions per merged batch besides ``max_batch_size``
            (``server.budget``): requests whose merged batch would pad past it wait for the next one, so short and
            long requests do not share a padded batch. Costs one extra tokenization per request (the token counts
            must be known before queueing). ``None`` (default): texts alone limit a batch.
        max_call_tokens: the most padded token positions (rows x width) of one model call, below what the model's
            own batching allows; a call still runs one text of any length the model takes (up to its
            ``max_length``). When a request's deadline passes (``timeout_s``, or its client leaving), the worker
            finishes the call it is in and runs nothing more for it, so it is free again within one call of at
            most ``max(max_call_tokens, max_length)`` padded tokens: ``model_call_seconds`` in ``/metrics`` says
            how long such calls take on the machine. ``None``: the model's batching alone sizes calls.
        max_wait_ms: how long the oldest queued request waits for others to join its batch.
        max_queue: the most texts waiting for the model; a request that would pass it gets 429 at once.
        max_request_bytes: the largest request body; larger ones get 413.
        max_inputs: the most texts in one request; more get 413. At most ``max_queue``.
        timeout_s: how long a request may wait for its vectors (queue and model time); then 504.
        normalize: L2-normalise the vectors (after ``dimensions`` truncation), as OpenAI's embeddings are.
        model_name: the model id ``/health`` and ``/v1/models`` report, and responses carry when a request
            names none; default the model folder's name. Only for a server of one model: with several, each is
            named after its folder.
        access_log: log one line per request (uvicorn's access log).
        read_timeout_s: how long a client has to send a request's headers (from the connection's start, or the
            end of the previous response on it; then the connection is closed), and again its body (then 408).
        keep_alive_s: how long an idle keep-alive connection stays open between requests.
        max_connections: a request arriving while this many connections are open (its own included) gets 503 at
            once (uvicorn's ``limit_concurrency``).
        shutdown_timeout_s: after SIGTERM (or Ctrl+C), how long requests in flight may take to finish; then they
            are cancelled and the server exits.
        allowed_hosts: ``Host`` header values accepted besides the address the server listens on (and
            ``localhost`` on a loopback or wildcard address; any IP address on a wildcard one); ``"*"`` accepts
            any. A ``Host`` that is none of these gets 400: it is how a DNS-rebinding web page reaches a local
            server.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    batch_size: int = 8
    max_batch_tokens: int | None = None
    max_call_tokens: int | None = 2048
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_request_bytes: int = 4 << 20
    max_inputs: int = 2048
    timeout_s: float = 30.0
    normalize: bool = True
    model_name: str | None = None
    access_log: bool = False
    read_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 512
    shutdown_timeout_s: float = 20.0
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty address such as 127.0.0.1, got {self.host!r}")
        _check_int("port", self.port, 0)
        if self.port > 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("max_batch_size", "batch_size", "max_queue", "max_request_bytes", "max_inputs",
                     "max_connections"):
            _check_int(name, getattr(self, name), 1)
        for name in ("max_batch_tokens", "max_call_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.max_inputs > self.max_queue:
            raise ValueError(
                f"max_inputs ({self.max_inputs}) must not exceed max_queue ({self.max_queue}): a request of "
                "max_inputs texts could never be queued. Raise max_queue or lower max_inputs."
            )
        _check_float("max_wait_ms", self.max_wait_ms, allow_zero=True)
        for name in ("timeout_s", "read_timeout_s", "keep_alive_s", "shutdown_timeout_s"):
            _check_float(name, getattr(self, name), allow_zero=False)
        if not isinstance(self.allowed_hosts, tuple) or not all(
            isinstance(host, str) and host and not any(c.isspace() for c in host) for host in self.allowed_hosts
        ):
            raise ValueError(f"allowed_hosts must be a tuple of host names (e.g. ('api.example.com',)) or ('*',), "
                             f"got {self.allowed_hosts!r}")
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise ValueError(f"model_name must be a non-empty string or None, got {self.model_name!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: object, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
