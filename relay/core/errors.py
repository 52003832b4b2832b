"""The relay's errors, each knowing its HTTP status and OpenAI error ``type``, and its body in
OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Plain exceptions: the core raises them and the worker may import them without Flask; the web
tier renders them (:mod:`relay.web.http_errors`).
"""

from __future__ import annotations

from typing import Any


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


class Conflict(RelayError):
    """The request cannot apply to the thing in its present state (a job that has ended)."""

    status = 409
    type = "invalid_request_error"


class UnsupportedMediaType(RelayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


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
