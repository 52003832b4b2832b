"""Rendering the relay's errors as HTTP responses, Werkzeug's own included."""

from __future__ import annotations

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException

from relay.core.errors import RelayError, RequestTooLarge


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
