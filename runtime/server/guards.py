"""What stands between a client and the model: the ``Host`` check, reading a JSON body within a size and a
deadline, watching for the client leaving, and turning every failure into an answer and one log line.

Each route of the app is an ``async (request) -> Response`` wrapped by ``guarded``; routes that take a JSON body
check it with ``require_json``, read it with ``read_body`` and wait for their work with ``answer_or_leave``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

__all__ = [
    "CLIENT_CLOSED",
    "ClientGone",
    "CloseUnread",
    "HostCheck",
    "answer_or_leave",
    "error_response",
    "guarded",
    "internal_error",
    "read_body",
    "require_json",
]

logger = logging.getLogger("deberta_onnx")
T = TypeVar("T")

# A status for the logs and counters only (nginx's): the client closed the connection before the answer.
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def error_response(error: ApiError) -> Response:
    """``error`` in OpenAI's shape, with ``Retry-After`` on 429 and 503 (``CloseUnread`` adds ``Connection:
    close`` where the body was left unread)."""
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def guarded(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Wraps a route so that nothing escapes it: an ``ApiError`` is answered and logged as one line (client
    errors at INFO, without a traceback), a client that left is logged at DEBUG only, a request cancelled at the
    shutdown deadline gets 503, and anything else is logged once with its traceback and answered with a generic
    500 that reveals nothing of the server's internals."""

    async def run(request: Request) -> Response:
        try:
            return await route(request)
        except ApiError as error:
            log = logger.info if error.status < 500 else logger.warning
            log("%s %s from %s: %d %s: %s", request.method, request.url.path, _client(request), error.status,
                error.code, error.message[:300])
            return error_response(error)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running at the shutdown deadline (and nothing else cancels a
            # request's task): answer them, instead of a traceback in the log and a bare 500 to the client.
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            logger.info("%s %s from %s: cancelled at the shutdown deadline", request.method, request.url.path,
                        _client(request))
            return error_response(ApiError(503, "the server is shutting down; retry on another instance",
                                           type="unavailable_error", code="shutting_down"))
        except ClientGone:
            logger.debug("%s %s from %s: the client left before its answer", request.method, request.url.path,
                         _client(request))
            return Response(status_code=CLIENT_CLOSED)
        except Exception:
            logger.exception("%s %s from %s failed", request.method, request.url.path, _client(request))
            return error_response(internal_error())

    run.__name__ = getattr(route, "__name__", "route")
    run.__doc__ = route.__doc__
    return run


def internal_error() -> ApiError:
    return ApiError(500, "internal error; the server's log says more", type="server_error", code="internal_error")


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def require_json(request: Request) -> None:
    """Refuses a body that is not declared ``application/json``: a web page can POST ``text/plain`` (or a form) to
    a local server without the browser asking the server first, but not JSON.

    Raises:
        ApiError: 415.
    """
    declared = request.headers.get("content-type")
    media = (declared or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {declared or 'none'}; send the body as JSON "
                            "with that header", code="unsupported_media_type")


async def read_body(request: Request, *, limit: int, timeout_s: float) -> bytes:
    """Reads the body, refusing with 413 as soon as it is known to be over ``limit`` bytes, and with 408 if it has
    not all arrived ``timeout_s`` after the headers (uvicorn has no body deadline of its own).

    Raises:
        ApiError: 413 or 408.
        ClientGone: the client closed the connection mid-body.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared)} bytes declared", limit)
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"{size} bytes read so far", limit)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError as exc:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came); send it "
                            "at once", code="request_timeout") from exc
    except ClientDisconnect as exc:
        raise ClientGone from exc
    return b"".join(chunks)


def _too_large(seen: str, limit: int) -> ApiError:
    return ApiError(413, f"request body is over this server's limit of {limit} bytes ({seen}); send fewer or "
                         "shorter texts per request", code="request_too_large")


async def _client_left(request: Request) -> None:
    """Returns once the client closed the connection (ASGI ``http.disconnect``). Only after the body was read: the
    next message the server sends then is the disconnect, whenever it comes."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_or_leave(request: Request, work: Awaitable[T], timeout_s: float) -> T:
    """Waits for ``work`` (e.g. ``MicroBatcher.submit``) while watching the client; cancels the work when the
    client leaves or ``timeout_s`` passes, so that nothing is computed for nobody.

    Raises:
        ClientGone: the client closed the connection first.
        asyncio.TimeoutError: ``timeout_s`` passed first.
        Exception: whatever ``work`` raised.
    """
    job = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait((job, left), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (the server's shutdown deadline): so is its work
        job.cancel()
        raise
    finally:
        left.cancel()
    if job in done:
        return job.result()
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)  # let the work leave its queue before answering
    if left in done:
        raise ClientGone
    raise asyncio.TimeoutError


class CloseUnread:
    """ASGI middleware: a response to a request whose body was not read to its end says ``Connection: close``, so
    that the server closes the connection once the response is sent.

    Without it the connection would wait for the rest of a body nobody reads (a 415, a refused ``Host``, a 404, a
    ``GET /health`` sent with a body, a 408 or 413): a client that trickles a byte now and then would hold its
    connection, and its place under ``max_connections``, past every deadline, since neither the header deadline
    nor the body deadline watch a body that no route reads.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        read = False

        async def receive_noting_the_end() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                read = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not read:
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_noting_the_end, send_closing)


def _has_body(scope: Scope) -> bool:
    """The request declares a body: a ``Content-Length`` other than 0, or a ``Transfer-Encoding``."""
    length = _header(scope, b"content-length")
    return (length is not None and length.strip().lstrip("0") != "") or _header(scope, b"transfer-encoding") is not None


class HostCheck:
    """ASGI middleware: answers 400 to a request whose ``Host`` header names neither the address the server
    listens on nor an allowed name. A web page that rebinds its own DNS name to 127.0.0.1 reaches a local server
    with its name in ``Host``; no IP address can be rebound, so IP literals are allowed on a wildcard address.

    Args:
        app: the app to guard.
        host: the configured listening address (an IP, a wildcard ``0.0.0.0`` / ``::``, or a name).
        allowed: more accepted names (``"*"``: any).
    """

    def __init__(self, app: ASGIApp, *, host: str, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.names = {_normal(name) for name in (host, *allowed)}
        self.addresses = _addresses(host)
        self.wildcard = any(address.is_unspecified for address in self.addresses)
        if self.wildcard or (self.addresses and all(address.is_loopback for address in self.addresses)):
            self.names.add("localhost")
        self.host = host

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        name = _normal(_strip_port(header))
        if name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.wildcard or address in self.addresses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = _header(scope, b"host")
            if not self.allows(header):
                logger.info("refused Host %r (this server listens on %s)", header, self.host)
                error = ApiError(400, f"Host {header!r} is not an address of this server (it listens on {self.host});"
                                      " start it with --allowed-host NAME to accept that name", code="invalid_host")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _strip_port(value: str) -> str:
    value = value.strip()
    if value.startswith("["):  # [::1]:8000
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _normal(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


def _addresses(host: str) -> set[Any]:
    """The IP addresses ``host`` stands for: itself if it is one, else what it resolves to (none if it does not)."""
    try:
        return {ipaddress.ip_address(_normal(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
