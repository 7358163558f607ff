"""The OpenAI embeddings wire format: request checks, response bodies, error bodies. Standard library + numpy.

Kept apart from the HTTP stack so that it can be tested, and reused, without a server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tokenization import lone_surrogate
from .errors import ApiError, bad_request

__all__ = [
    "ENCODING_FORMATS",
    "EmbeddingRequest",
    "check_model",
    "decode_json",
    "embedding_response",
    "json_type",
    "parse_embedding_request",
    "read_object",
]

ENCODING_FORMATS = ("float", "base64")
_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")


@dataclass(frozen=True, kw_only=True)
class EmbeddingRequest:
    """A checked ``POST /v1/embeddings`` body."""

    texts: list[str]
    model: str | None
    encoding_format: str
    dimensions: int | None


def decode_json(body: bytes) -> object:
    """Decodes a request body as UTF-8 JSON, turning every way it can fail into a 400 that says why.

    Hostile documents fail here with a clear message instead of an internal error: nesting deeper than the
    interpreter's recursion limit (e.g. 100,000 nested arrays), integers longer than Python's 4,300-digit limit
    for decimal conversion, invalid UTF-8 or JSON.

    Raises:
        ApiError: 400 ``invalid_json``.
    """
    try:
        return json.loads(body.decode("utf-8"))  # bytes would let json guess UTF-16 or UTF-32 from a BOM
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 encoded JSON",
                          None, "invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          None, "invalid_json") from exc
    except RecursionError as exc:
        raise bad_request("request body nests arrays or objects too deeply to be read; send one JSON object whose "
                          "fields hold strings or lists of strings", None, "invalid_json") from exc
    except ValueError as exc:  # int() of a number past sys.get_int_max_str_digits() (4,300 by default)
        raise bad_request(f"request body holds a number that cannot be read ({str(exc).split(':')[0]}); no field of "
                          "this API takes such a number", None, "invalid_json") from exc


def read_object(body: bytes, *, example: str) -> dict[str, Any]:
    """The request body as a JSON object (``decode_json``).

    Args:
        body: the raw body (UTF-8 JSON).
        example: a short valid body, shown when the body is not an object.

    Raises:
        ApiError: 400 ``invalid_json`` for a body ``decode_json`` refuses, or one that is not an object.
    """
    data = decode_json(body)
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {json_type(data)}; send {example}", None,
                          "invalid_json")
    return data


def check_model(data: dict[str, Any]) -> str | None:
    """The optional ``model`` field of a parsed body: ``None`` when absent or null, else a str of valid Unicode
    (it is echoed in the answer, which must encode as UTF-8).

    Raises:
        ApiError: 400 naming ``model``: not a string, or a lone surrogate in it.
    """
    model = data.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise bad_request(f"field 'model' must be a string, got {json_type(model)}", "model")
    position = None if model.isascii() else lone_surrogate(model)
    if position is not None:
        raise bad_request(f"field 'model' holds an unpaired surrogate (U+{ord(model[position]):04X} at character "
                          f"{position}); send the model's name as valid Unicode text", "model")
    return model


def parse_embedding_request(body: bytes, *, max_inputs: int, hidden_size: int) -> EmbeddingRequest:
    """Parses and checks an embeddings request body.

    Args:
        body: the raw request body (UTF-8 JSON).
        max_inputs: the most texts one request may carry.
        hidden_size: the model's vector length, the upper bound of ``dimensions``.

    Returns:
        The request, with ``input`` always a list of str.

    Raises:
        ApiError: 400 for malformed or hostile JSON (see ``decode_json``), a missing or mistyped field (the
            message names it, and the index of a bad list element); 413 for more than ``max_inputs`` texts.
    """
    data = read_object(body, example='{"input": ["text", ...], "model": "..."}')
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted fields are {', '.join(_FIELDS)}",
                          unknown[0], "unknown_field")
    if "input" not in data:
        raise bad_request("field 'input' is required: a string or a list of strings", "input", "missing_field")
    texts = _parse_input(data["input"], max_inputs)

    model = check_model(data)
    encoding_format = data.get("encoding_format")
    encoding_format = "float" if encoding_format is None else encoding_format
    if encoding_format not in ENCODING_FORMATS:
        raise bad_request(f"field 'encoding_format' must be one of {', '.join(map(repr, ENCODING_FORMATS))}, "
                          f"got {encoding_format!r}", "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            raise bad_request(f"field 'dimensions' must be an integer, got {json_type(dimensions)}", "dimensions")
        if not 1 <= dimensions <= hidden_size:
            raise bad_request(f"field 'dimensions' must be between 1 and the model's {hidden_size} dimensions, "
                              f"got {dimensions}", "dimensions")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"field 'user' must be a string, got {json_type(user)}", "user")
    return EmbeddingRequest(texts=texts, model=model, encoding_format=encoding_format, dimensions=dimensions)


def _parse_input(value: object, max_inputs: int) -> list[str]:
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        texts = value
    else:
        raise bad_request(f"field 'input' must be a string or a list of strings, got {json_type(value)}", "input")
    if not texts:
        raise bad_request("field 'input' is an empty list; send at least one string", "input")
    if len(texts) > max_inputs:
        raise ApiError(413, f"field 'input' holds {len(texts)} texts; this server takes at most {max_inputs} per "
                            "request. Split the list over several requests.", param="input", code="too_many_inputs")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise _not_text(texts, index)
        # Lone surrogates survive JSON decoding ("\ud800") but no tokenizer can take them; refusing them here
        # names this request's index, and keeps them out of batches merged with other requests.
        position = None if text.isascii() else lone_surrogate(text)
        if position is not None:
            raise bad_request(f"input[{index}] holds an unpaired surrogate (U+{ord(text[position]):04X} at character "
                              f"{position}); send valid Unicode text", f"input[{index}]")
    return texts


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _not_text(texts: list[Any], index: int) -> ApiError:
    # OpenAI's API also takes token ids (a list of ints, or a list of such lists); say so plainly.
    if _is_token_ids(texts) or _is_token_ids(texts[index]):
        param = "input" if _is_token_ids(texts) else f"input[{index}]"
        return bad_request("token ids as input are not supported: this server tokenizes text with the model's own "
                           "tokenizer. Send the text as a string.", param, "unsupported_value")
    return bad_request(f"input[{index}] is {json_type(texts[index])}, not a string; every element of 'input' must "
                       "be a string", f"input[{index}]")


def json_type(value: object) -> str:
    """How a JSON value reads in a message: ``null``, ``a boolean``, ``a number``, ``a string``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def embedding_response(
    vectors: np.ndarray, *, token_counts: Sequence[int], encoding_format: str, model: str
) -> dict[str, Any]:
    """The response body of ``POST /v1/embeddings``, in OpenAI's shape.

    ``base64`` carries each vector as its little-endian float32 bytes, as OpenAI's API does.
    """
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        embeddings: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        embeddings = rows.tolist()
    tokens = int(sum(token_counts))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
