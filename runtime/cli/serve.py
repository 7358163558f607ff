"""``deberta-onnx serve``: the OpenAI-compatible HTTP server; flags map onto ``ServerConfig`` and its defaults."""

from __future__ import annotations

import argparse
from typing import Any

from ..encoder import Encoder
from ..server import ServerConfig
from .common import add_load_flags, config_defaults, load

__all__ = ["add_parser", "run"]

_FIELDS = tuple(config_defaults(ServerConfig))


def add_parser(commands: Any) -> None:
    d = ServerConfig()
    parser = commands.add_parser(
        "serve", help="serve a model folder over HTTP (OpenAI-compatible /v1/embeddings; needs the server extra)",
        description="Serve MODEL_DIR over HTTP: POST /v1/embeddings (OpenAI's request and response shape), "
                    "GET /health, GET /v1/models. Concurrent requests are merged into one model call. "
                    "Queue full: 429; body too large or too many inputs: 413; bad JSON or fields, or a Host "
                    "that is not this server: 400; not application/json: 415; body too slow: 408; timeout: 504. "
                    "Stop with Ctrl+C or SIGTERM: in-flight requests finish first (within --shutdown-timeout-s), "
                    "then SIGTERM exits 0.",
    )
    parser.add_argument("model_dir", help="a folder written by `deberta-onnx export`")
    parser.add_argument("--host", default=d.host, help="address to listen on (default %(default)s: this "
                       "machine only; put a proxy or firewall in front before listening wider)")
    parser.add_argument("--port", type=int, default=d.port, help="TCP port (default %(default)s; 0 picks a "
                       "free one, printed at start)")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                       help="most texts merged from concurrent requests into one encode call (default "
                            "%(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="rows per model run inside that call; the merged texts are sorted by length first "
                            "(default %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                       help="how long a queued request waits for others to join its batch (default %(default)s)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                       help="most texts waiting for the model; a request beyond it gets 429 (default %(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                       help="largest request body in bytes; larger ones get 413 (default %(default)s)")
    parser.add_argument("--max-inputs", type=int, default=d.max_inputs,
                       help="most texts in one request; more get 413 (default %(default)s, as OpenAI)")
    parser.add_argument("--timeout-s", type=float, default=d.timeout_s,
                       help="seconds a request may wait for its vectors, queue included; then 504 "
                            "(default %(default)s)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=d.normalize,
                       help="L2-normalise vectors, after `dimensions` truncation (default on, as OpenAI)")
    parser.add_argument("--model-name", default=d.model_name,
                       help="model id to report (default: the folder's name)")
    parser.add_argument("--access-log", action="store_true", default=d.access_log,
                       help="log one line per request")
    parser.add_argument("--read-timeout-s", type=float, default=d.read_timeout_s,
                       help="seconds a client has to send a request's headers (then the connection is closed), and "
                            "again its body (then 408) (default %(default)s)")
    parser.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                       help="seconds an idle keep-alive connection stays open (default %(default)s)")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                       help="a request arriving while this many connections are open (its own included) gets "
                            "503 (default %(default)s)")
    parser.add_argument("--shutdown-timeout-s", type=float, default=d.shutdown_timeout_s,
                       help="after SIGTERM or Ctrl+C, seconds requests in flight may take to finish; /health says "
                            "503 meanwhile (default %(default)s)")
    parser.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=list(d.allowed_hosts),
                       metavar="HOST", help="accept this Host header too, repeatable; '*' accepts any (default: "
                                            "only the listening address, and localhost on loopback)")
    add_load_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..server.app import serve

    values = {name: getattr(args, name) for name in _FIELDS}
    values["allowed_hosts"] = tuple(values["allowed_hosts"])
    config = ServerConfig(**values)
    encoder = load(args, Encoder)
    serve(encoder, config)  # SIGTERM drains and returns: exit 0
    return 0
