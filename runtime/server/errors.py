"""The server's error type: an error answered to the client in OpenAI's error body. Standard library only."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "bad_request"]


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status code.
        message: what is wrong and how to fix it.
        type: the error family (``invalid_request_error``, ``overloaded_error``, ...), as in OpenAI's API.
        param: the request field at fault (``"input[3]"``), or ``None``.
        code: a short machine-readable reason (``"invalid_json"``, ``"queue_full"``, ...), or ``None``.
    """

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A 400 ``invalid_request_error`` naming ``param``."""
    return ApiError(400, message, param=param, code=code)
