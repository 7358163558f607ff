"""Checks shared by the JSON wire formats of the rerank and classify routes: the body as a JSON object, its
fields, texts. Standard library only; every failure is an ``ApiError`` (400, or 413 for too many inputs) that
names the field at fault and says what is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tokenization import lone_surrogate
from .errors import ApiError, bad_request
from .openai_api import check_model, json_type, read_object

__all__ = [
    "bad_request",
    "check_bool",
    "check_count",
    "check_fields",
    "check_model",
    "check_text",
    "json_type",
    "read_object",
    "too_many",
]


def check_fields(data: dict[str, Any], accepted: Sequence[str], required: Sequence[str],
                 unsupported: dict[str, str] | None = None) -> None:
    """Refuses unknown fields (naming the accepted ones) and missing required ones.

    Args:
        data: the parsed body.
        accepted: every field the route reads.
        required: the ones that must be present.
        unsupported: fields other APIs of the kind accept and this server does not, with why (for the message).
    """
    unknown = sorted(set(data) - set(accepted))
    for name in unknown:
        if unsupported and name in unsupported:
            raise bad_request(f"field {name!r} is not supported: {unsupported[name]}", name, "unsupported_field")
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted fields are "
                          f"{', '.join(accepted)}", unknown[0], "unknown_field")
    for name in required:
        if name not in data:
            raise bad_request(f"field {name!r} is required", name, "missing_field")


def check_text(value: object, param: str, what: str = "a string") -> str:
    """``value`` if it is a str of valid Unicode, else a 400 naming ``param``."""
    if not isinstance(value, str):
        raise bad_request(f"{param} must be {what}, got {json_type(value)}", param)
    # Lone surrogates survive JSON decoding ("\ud800") but no tokenizer can take them; refusing them here names
    # this request's field, and keeps them out of batches merged with other requests.
    position = None if value.isascii() else lone_surrogate(value)
    if position is not None:
        raise bad_request(f"{param} holds an unpaired surrogate (U+{ord(value[position]):04X} at character "
                          f"{position}); send valid Unicode text", param)
    return value


def check_bool(data: dict[str, Any], name: str, default: bool) -> bool:
    """The boolean field ``name`` (``default`` when absent or null)."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"field {name!r} must be true or false, got {json_type(value)}", name)
    return value


def check_count(data: dict[str, Any], name: str) -> int | None:
    """The optional positive integer field ``name`` (``None`` when absent or null)."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"field {name!r} must be a positive integer, got {json_type(value)}", name)
    if value < 1:
        raise bad_request(f"field {name!r} must be at least 1, got {value}", name)
    return value


def too_many(name: str, count: int, limit: int, what: str) -> ApiError:
    """The 413 for a request carrying more than ``limit`` items in field ``name``."""
    return ApiError(413, f"field {name!r} holds {count} {what}; this server takes at most {limit} per request. "
                         "Split them over several requests.", param=name, code="too_many_inputs")
