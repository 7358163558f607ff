"""``deberta-onnx serve``: the HTTP server of one or several model folders; flags map onto ``ServerConfig`` and its
defaults."""

from __future__ import annotations

import argparse
from typing import Any

from ..heap import fix_mmap_threshold
from ..server import ServerConfig
from .common import add_load_flags, config_defaults, load

__all__ = ["add_parser", "run"]

_FIELDS = tuple(config_defaults(ServerConfig))


def add_parser(commands: Any) -> None:
    d = ServerConfig()
    parser = commands.add_parser(
        "serve", help="serve model folders over HTTP (/v1/embeddings, /v1/rerank, /v1/classify, "
                      "/v1/question-answering, /metrics; needs the server extra)",
        description="Serve each MODEL_DIR over HTTP as its task allows: an embedding model on POST /v1/embeddings "
                    "(OpenAI's request and response shape), a sequence classifier or cross-encoder on POST "
                    "/v1/rerank (Cohere's and Jina's shape; one-label models) and POST /v1/classify, a token "
                    "classifier on POST /v1/classify (spans), a question-answering model on POST "
                    "/v1/question-answering (answer spans). With several folders a request names its model in "
                    "'model' (the folder's name; unknown: 404). GET /health, GET /v1/models, GET /metrics "
                    "(Prometheus). Concurrent requests are merged into one model call. "
                    "Queue full: 429; body too large or too many inputs: 413; bad JSON or fields, or a Host "
                    "that is not this server: 400; not application/json: 415; body too slow: 408; timeout: 504. "
                    "Stop with Ctrl+C or SIGTERM: in-flight requests finish first (within --shutdown-timeout-s), "
                    "then SIGTERM exits 0.",
    )
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="one or more folders written by `deberta-onnx export` (embedding, sequence- or "
                             "token-classification, question-answering)")
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
    parser.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                       help="also cap a merged batch at this many padded tokens, so that short and long requests "
                            "do not share a padded batch (default: none; costs one extra tokenization per "
                            "request)")
    parser.add_argument("--max-call-tokens", type=_optional_int, default=d.max_call_tokens,
                       help="most padded tokens (rows x width) of one model call; at a request's deadline the "
                            "worker finishes the call it is in, so it is free again within one call of this size "
                            "(or of one text of the model's maximum length, if larger) (default %(default)s; "
                            "'none': the model's batching alone)")
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
                       help="model id to report, with one MODEL_DIR (default: the folder's name)")
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


def _optional_int(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..server.app import serve
    from ..server.models import load_folder

    values = {name: getattr(args, name) for name in _FIELDS}
    values["allowed_hosts"] = tuple(values["allowed_hosts"])
    config = ServerConfig(**values)
    if config.model_name is not None and len(args.model_dirs) > 1:
        raise ValueError("--model-name names the model of one MODEL_DIR; with several, each "
                         "model is named after its folder")
    if args.arena_shrink_tokens is not None:
        fix_mmap_threshold()  # this process is the server's alone: memory a burst freed goes back
    models = [load(args, load_folder, model_dir) for model_dir in args.model_dirs]
    serve(models, config)  # SIGTERM drains and returns: exit 0
    return 0
