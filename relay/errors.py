"""API errors, each knowing its HTTP status and OpenAI error ``type``, rendered in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException


class RelayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(RelayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RelayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(RelayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RequestTooLarge(RelayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, message: str = "The request body is larger than the relay accepts.") -> None:
        super().__init__(message)


class RateLimited(RelayError):
    status = 429
    type = "requests"  # OpenAI's type for request-count limits
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class Unavailable(RelayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_response(error: RelayError) -> Response:
    response = jsonify(error.to_dict())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def from_http_exception(exc: HTTPException) -> RelayError:
    """Werkzeug's own errors (404 route, 405, 413 body limit...) in the same JSON shape."""
    status = exc.code or 500
    if status == 413:
        return RequestTooLarge()
    error = RelayError(exc.description or exc.name, code=exc.name.lower().replace(" ", "_"))
    error.status = status
    error.type = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return error
