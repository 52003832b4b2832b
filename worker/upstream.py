"""Talking to the upstream: one streaming Chat Completions call (its body: :mod:`worker.reader`).

Everything that can go wrong on the upstream side ends up as :class:`UpstreamError`, carrying
a message fit for the viewer and whether trying again could help.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import orjson
import requests
import urllib3

from relay.core.chunks import dumps
from relay.core.routes import Upstream

from . import http1

_ERROR_BODY_LIMIT = 64 * 1024  # an error body is a message, not a payload: read no more
# Besides 5xx: a timeout, a conflict and "too many requests" may pass on a second try.
RETRYABLE_STATUSES = (408, 409, 429)


class UpstreamError(Exception):
    def __init__(
        self,
        message: str,
        *,
        type: str = "upstream_error",
        code: str | None = None,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


MAX_MESSAGE_CHARS = 500  # an upstream's error message shown to viewers: a sentence, not a dump
MAX_CODE_CHARS = 64
# What must never be shown to viewers even if an upstream echoes it: API keys, bearer tokens.
_SECRETS = re.compile(r"\b(sk-|rk-|Bearer\s+)[A-Za-z0-9._~+/=-]{6,}|eyJ[A-Za-z0-9._-]{20,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def sanitize(text: str, *secrets: str) -> str:
    """Text from an upstream made fit to show viewers: no credentials (``secrets`` besides the
    usual shapes), no control characters, a bounded length."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _CONTROL.sub(" ", _SECRETS.sub(lambda m: m.group(1) + "[redacted]", text)).strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def error_from_json(payload: Any, fallback: str) -> tuple[str, str, str | None]:
    """(message, type, code) from an OpenAI-style ``{"error": ...}`` payload, or a fallback;
    each sanitised and bounded."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return (
            sanitize(str(error.get("message") or fallback)),
            sanitize(str(error.get("type") or "upstream_error"))[:MAX_CODE_CHARS],
            sanitize(code)[:MAX_CODE_CHARS] if isinstance(code, str) else None,
        )
    if isinstance(error, str):  # some servers send {"error": "text"}
        return sanitize(error), "upstream_error", None
    return fallback, "upstream_error", None


def _retry_after(response: requests.Response | http1.Answer) -> float | None:
    """The ``Retry-After`` seconds, if a finite, non-negative number (``nan`` is not one)."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _read_error_body(response: requests.Response | http1.Answer) -> Any:
    try:
        if isinstance(response, http1.Answer):
            raw = response.read_all(_ERROR_BODY_LIMIT)
        else:
            raw = response.raw.read(_ERROR_BODY_LIMIT, decode_content=True)
        return orjson.loads(raw)
    except Exception:  # noqa: BLE001 - any unreadable body gets the generic message
        return None


class Session(requests.Session):
    """The worker's HTTP client: plain-HTTP upstreams through :mod:`worker.http1`'s pool
    (``plain``), anything else (HTTPS, a proxy from the environment) through ``requests``."""

    def __init__(self, max_idle: int = 64) -> None:
        super().__init__()
        self.plain = http1.Pool(max_idle)

    def close(self) -> None:
        self.plain.close()
        super().close()


@functools.lru_cache(maxsize=64)
def _direct(url: str) -> bool:
    """Whether a request to ``url`` may skip requests' layers: plain HTTP, with no proxy from
    the environment (requests honours those; :mod:`worker.http1` does not). HTTPS keeps
    requests' certificate handling; its handshake dwarfs the difference anyway."""
    return url.startswith("http://") and not requests.utils.get_environ_proxies(url)


def _post(
    session: requests.Session, upstream: Upstream, data: str, headers: dict
) -> requests.Response | http1.Answer:
    """The POST: through :mod:`worker.http1` where it may (see :class:`Session`)."""
    url = upstream.chat_url
    plain = getattr(session, "plain", None)
    if plain is None or not _direct(url):
        return session.post(url, data=data, headers=headers, stream=True,
                            timeout=(upstream.connect_timeout, upstream.read_timeout))  # fmt: skip
    return plain.post(url, data.encode(), headers, connect_timeout=upstream.connect_timeout,
                      read_timeout=upstream.read_timeout)  # fmt: skip


def _headers(upstream: Upstream) -> dict[str, str]:
    # identity: the reader strips chunked framing itself and takes no compressed body (a
    # compressed stream would also hold back text until a block is full).
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "Accept-Encoding": "identity",
    }
    headers.update(upstream.headers)
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers


def send_on_kept(session: requests.Session, upstream: Upstream, body: dict) -> http1.Sent | None:
    """:func:`open_stream`'s request, written now if a kept connection to a plain-HTTP
    upstream is idle (never a connect or a wait; None, nothing written, otherwise). Its answer
    is read by :func:`answer_of`."""
    plain = getattr(session, "plain", None)
    if plain is None or not _direct(upstream.chat_url):
        return None
    data = dumps({**body, "stream": True}).encode()
    return plain.send(upstream.chat_url, data, _headers(upstream), kept_only=True,
                      connect_timeout=upstream.connect_timeout,
                      read_timeout=upstream.read_timeout)  # fmt: skip


def open_stream(session: requests.Session, upstream: Upstream, body: dict) -> Any:
    """POST the request with ``stream: true``; the open response (a ``requests.Response`` or a
    :class:`Streamed`), or :class:`UpstreamError`."""
    data = dumps({**body, "stream": True})
    return _opened(upstream, lambda: _post(session, upstream, data, _headers(upstream)))


def answer_of(upstream: Upstream, sent: http1.Sent) -> Any:
    """:func:`open_stream`'s outcome for a request :func:`send_on_kept` wrote."""
    return _opened(upstream, sent.answer)


def _opened(upstream: Upstream, answer: Callable[[], requests.Response | http1.Answer]) -> Any:
    """The answer to a request to ``upstream``, open if it is a stream; else UpstreamError."""
    try:
        response = answer()
    except urllib3.exceptions.NewConnectionError:  # a ConnectTimeoutError subclass: first
        raise UpstreamError(
            "Could not reach the upstream: ConnectionError.",
            code="upstream_unreachable",
            retryable=True,
        ) from None
    except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
        raise UpstreamError(
            f"The upstream did not answer within {upstream.read_timeout:g}s.",
            code="upstream_timeout",
            retryable=True,
        ) from None
    except http1.MalformedAnswer as exc:
        raise UpstreamError(
            f"The upstream's answer is not HTTP: {exc}.", code="upstream_malformed"
        ) from None
    except ValueError as exc:  # a header from the routes file or a key that HTTP cannot carry
        raise UpstreamError(f"The request to the upstream is invalid: {exc}.") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        name = "ConnectionError" if not isinstance(exc, requests.RequestException) else None
        raise UpstreamError(
            f"Could not reach the upstream: {name or exc.__class__.__name__}.",
            code="upstream_unreachable",
            retryable=True,
        ) from None

    status = response.status_code
    if status >= 400:
        payload = _read_error_body(response)
        response.close()
        message, type_, code = error_from_json(payload, f"HTTP {status}")
        raise UpstreamError(
            f"The upstream answered {status}: {message}",
            type=type_,
            code=code or f"upstream_http_{status}",
            status=status,
            retryable=status in RETRYABLE_STATUSES or status >= 500,
            retry_after=_retry_after(response),
        )
    if "json" in response.headers.get("Content-Type", ""):
        # An error (or a non-streamed answer) sent as plain JSON in place of a stream.
        payload = _read_error_body(response)
        response.close()
        message, type_, code = error_from_json(payload, "expected an event stream, got JSON")
        raise UpstreamError(f"The upstream answered: {message}", type=type_, code=code)
    return response
