"""Which sites' pages may use the relay from a browser, and which hosts requests may name.

Browsers send a cross-site request without asking first only when it looks like a form (a
``text/plain`` body, no ``Authorization``): the JSON endpoints refuse those (415), so another
site's page must ask (a CORS preflight), and only ``RELAY_CORS_ORIGINS`` are answered. The
``Host`` a request names must be one of ``RELAY_ALLOWED_HOSTS`` (and the public URL's), so that
a name an attacker points at the relay (DNS rebinding) gets nothing, and the URLs the relay
hands out never carry a host a client made up.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, request
from werkzeug.sansio.utils import host_is_trusted

from relay.core.errors import InvalidRequest
from relay.core.settings import Settings

EXPOSED = "X-Relay-Job-Id, X-Relay-Message-Id, X-Relay-Events-Url, X-Relay-Watch-Url, " \
    "X-Relay-Cancel-Url, X-Relay-Default-Model"  # fmt: skip
UNCHECKED_PATHS = ("/healthz",)  # load balancers probe by address: nothing there to steal


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The hosts requests may name; None for any."""
    hosts = list(settings.allowed_hosts)
    if "*" in hosts:
        return None
    if settings.public_url:
        hosts.append(urlsplit(settings.public_url).hostname or "")
    return hosts


def guard(app: Flask, settings: Settings) -> None:
    """Refuse requests for other hosts, and answer allowed origins' CORS."""
    hosts = allowed_hosts(settings)
    origins = set(settings.cors_origins)

    @app.before_request
    def _check_host() -> None:
        if hosts is not None and request.path not in UNCHECKED_PATHS:
            if not host_is_trusted(request.host, hosts):
                raise InvalidRequest(
                    "This relay does not answer for that host name.", code="host_not_allowed"
                )

    @app.after_request
    def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if "Vary" in response.headers:
            response.vary.add("Origin")
        else:  # most responses: without parsing and writing back a header set
            response.headers["Vary"] = "Origin"
        if origin and origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, Last-Event-ID"
            )
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers["Access-Control-Max-Age"] = "600"
        return response
