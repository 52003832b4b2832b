"""Rendering the relay's errors as HTTP responses, Werkzeug's own included."""

from __future__ import annotations

from flask import Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound

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
    message = exc.description or exc.name
    if isinstance(exc, NotFound) and request.url_rule is None and (meant := _meant_path()):
        message = (
            f"Nothing is served at {request.path}; did you mean {request.method} {meant}? "
            "The relay's OpenAI API is under /v1: a client's base URL ends in /v1, once."
        )
    error = RelayError(message, code=exc.name.lower().replace(" ", "_"))
    error.status = status
    error.type = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return error


def _meant_path() -> str | None:
    """The path a client most likely meant when its base URL left out /v1 or added it twice
    (``/models``, ``/v1/v1/models``): one the relay serves for this method, or None."""
    path = request.path
    if path.startswith("/v1/v1/"):
        candidate = path.removeprefix("/v1")
    elif path.startswith("/v1/"):
        return None
    else:
        candidate = "/v1" + path
    try:
        current_app.url_map.bind("relay").match(candidate, method=request.method)
    except HTTPException:  # not served, another method only, or a redirect
        return None
    return candidate
