"""Settings shared by the web tier and the worker: one frozen, typed record built at start.

Every setting is a ``RELAY_*`` environment variable named after its field (``redis_url`` is
``RELAY_REDIS_URL``); the README's configuration table lists them. Values are parsed strictly,
by the field's type: booleans are ``true/false/1/0/yes/no``, numbers must be finite and within
the field's range, URLs need a scheme of their kind. A bad value stops the process at start
with a :class:`SettingsError` naming the variable, instead of surfacing later as odd behaviour.

This replaces Flask's ``from_prefixed_env`` (STYLE.md's app-factory pattern), which parses
values as JSON: ``RELAY_UPSTREAM_INCLUDE_USAGE=False`` stayed the truthy string ``"False"``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PREFIX = "RELAY_"
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class SettingsError(ValueError):
    """A setting with a value the relay cannot use; the message names the variable."""


def _range(low: float, high: float = math.inf) -> dict[str, Any]:
    return {"range": (low, high)}


def _url(*schemes: str) -> dict[str, Any]:
    return {"schemes": schemes}


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
HTTP_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default; see the README's configuration table for each."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_url(*REDIS_SCHEMES))
    # RELAY_REDIS_URL names any one node of a Redis Cluster (7.0+), which holds everything.
    redis_cluster: bool = False
    # Per process (per cluster node). Viewers borrow a connection only to read the replay log;
    # live events come over the one shared subscription, so a few serve thousands of viewers.
    redis_max_connections: int = field(default=16, metadata=_range(1))
    # A TOML file of upstreams and model routes (relay/core/routes.py); unset: every model goes
    # to RELAY_UPSTREAM_BASE_URL.
    upstreams_file: str = ""
    upstream_base_url: str = field(
        default="https://api.openai.com/v1", metadata=_url(*HTTP_SCHEMES)
    )
    upstream_api_key: str = ""
    upstream_connect_timeout: float = field(default=10.0, metadata=_range(0.001))
    upstream_read_timeout: float = field(default=60.0, metadata=_range(0.001))
    upstream_max_retries: int = field(default=2, metadata=_range(0, 100))
    upstream_silence_log_seconds: float = field(default=10.0, metadata=_range(0))
    upstream_include_usage: bool = True
    default_model: str = "gpt-4o-mini"
    lease_seconds: float = field(default=30.0, metadata=_range(0.1))
    retention_seconds: int = field(default=3600, metadata=_range(1))
    job_max_age_seconds: int = field(default=86400, metadata=_range(1))
    max_body_bytes: int = field(default=1024 * 1024, metadata=_range(1))
    max_messages: int = field(default=500, metadata=_range(0))  # 0: no limit
    max_input_chars: int = field(default=400_000, metadata=_range(0))  # 0: no limit
    max_tokens: int = field(default=0, metadata=_range(0))  # 0: no ceiling
    keepalive_seconds: float = field(default=15.0, metadata=_range(0.01))
    retry_ms: int = field(default=2000, metadata=_range(0))
    viewer_queue_size: int = field(default=1024, metadata=_range(1))
    # Caught-up viewers get live events written by the process's dispatcher in one send each
    # (relay.web.fanout); false routes every event through the viewer's own greenlet.
    direct_writes: bool = True
    worker_concurrency: int = field(default=256, metadata=_range(1))
    worker_grace_seconds: float = field(default=30.0, metadata=_range(0))
    cancel_on_disconnect: bool = True
    max_context_tokens: int = field(default=4096, metadata=_range(1))
    max_response_tokens: int = field(default=1000, metadata=_range(0))
    conversation_ttl_seconds: int = field(default=30 * 24 * 3600, metadata=_range(1))
    chatgpt_web_secret: str = ""
    # Comma-separated; seeded into Redis as SHA-256 digests (relay.core.apikeys), mirrored:
    # a key taken out of the list stops working at the next start.
    api_keys: tuple[str, ...] = ()
    # Without any API key, may anyone create jobs? Only when this says so: a relay whose keys
    # were lost with Redis's data must not fall open. With keys, keys are always required.
    open_access: bool = False
    # Per caller (an API key, or a client address when the relay runs open); 0: no limit. A
    # key's own limits (python -m relay.apikeys create --rpm/--concurrency) take precedence.
    rate_limit_rpm: int = field(default=0, metadata=_range(0))
    # Failed API-key, token, secret and message-id checks per client address per minute; past
    # it the address is refused (429) for a minute, right credentials or not. 0: no limit.
    auth_failures_per_minute: int = field(default=30, metadata=_range(0))
    concurrency_limit: int = field(default=0, metadata=_range(0))
    # Proxies in front of gunicorn trusted to set X-Forwarded-For/-Proto (1 behind one nginx).
    trusted_proxies: int = field(default=0, metadata=_range(0, 10))
    # Beyond this many queued jobs new ones are refused (503) until workers catch up; 0: no cap.
    max_queued_jobs: int = field(default=10000, metadata=_range(0))
    queue_full_retry_after: int = field(default=5, metadata=_range(1))
    # Open streams one web process serves to one client address, and to one read token (a
    # share link: many people may watch with it); 429 beyond. 0: no cap.
    max_streams_per_client: int = field(default=256, metadata=_range(0))
    max_streams_per_token: int = field(default=1000, metadata=_range(0))
    # A viewer whose connection takes no bytes for this long is cut off (it may resume); 0: never.
    send_timeout_seconds: float = field(default=30.0, metadata=_range(0))
    # Origins (scheme://host[:port]) whose pages may call the relay from a browser (CORS), such
    # as chatgpt-web's front end served elsewhere. Empty: no other site may.
    cors_origins: tuple[str, ...] = ()
    # The relay's address as its clients reach it (https://chat.example.com): the base of every
    # URL it returns. Unset: the request's own host, when it is one of the allowed hosts.
    public_url: str = field(default="", metadata={**_url(*HTTP_SCHEMES), "optional": True})
    # Hosts (Host header, without the port) requests may name; ".example.com" allows its
    # subdomains, "*" any host. Others are refused (DNS rebinding). public_url's host is added.
    allowed_hosts: tuple[str, ...] = field(
        default=("localhost", "127.0.0.1", "[::1]"), metadata={"nonempty": True}
    )
    # When set, GET /metrics needs "Authorization: Bearer <this>" (Prometheus' authorization).
    metrics_key: str = ""
    moderation: bool = False
    moderation_fail_open: bool = False
    moderation_model: str = ""

    def __post_init__(self) -> None:
        database = urlsplit(self.redis_url).path.strip("/")
        if self.redis_cluster and database not in ("", "0"):
            raise SettingsError(
                f"RELAY_REDIS_URL={self.redis_url!r}: a Redis Cluster has database 0 only"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """The defaults, then ``RELAY_*`` variables, then ``overrides`` (by field name; strings
        are parsed like the variables, other values checked against the field's type)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            name = PREFIX + spec.name.upper()
            if spec.name in overrides:
                values[spec.name] = _parse(spec, overrides.pop(spec.name), name)
            elif name in environ:
                values[spec.name] = _parse(spec, environ[name], name)
        if overrides:
            raise SettingsError(f"unknown settings: {', '.join(sorted(overrides))}")
        return cls(**values)


def _parse(spec: dataclasses.Field, raw: Any, name: str) -> Any:
    """One value of the field's type, or :class:`SettingsError` naming the variable."""
    kind = spec.type if isinstance(spec.type, str) else spec.type.__name__
    try:
        if kind == "bool":
            value: Any = _boolean(raw)
        elif kind == "int":
            value = _number(raw, int)
        elif kind == "float":
            value = _number(raw, float)
        elif kind == "tuple[str, ...]":
            value = _items(raw)
            if not value and spec.metadata.get("nonempty"):
                raise ValueError("must name at least one (comma-separated)")
        else:
            value = raw if isinstance(raw, str) else _wrong(raw, "a string")
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    low, high = spec.metadata.get("range", (-math.inf, math.inf))
    if isinstance(value, int | float) and not low <= value <= high:
        limits = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise SettingsError(f"{name}={raw!r}: must be {limits}")
    schemes = spec.metadata.get("schemes")
    if schemes and not value.startswith(schemes) and (value or not spec.metadata.get("optional")):
        raise SettingsError(f"{name}={raw!r}: must be a URL starting with {' or '.join(schemes)}")
    return value


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be true or false (also 1/0, yes/no)")


def _number(raw: Any, kind: type) -> int | float:
    if isinstance(raw, bool):
        _wrong(raw, "a number")
    if isinstance(raw, int | float) and not isinstance(raw, str):
        value = raw
    else:
        text = str(raw).strip()
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise ValueError(f"must be {'a whole number' if kind is int else 'a number'}") from None
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        _wrong(raw, "a whole number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return kind(value)  # type: ignore[no-any-return]


def _items(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, tuple | list):
        return tuple(str(item) for item in raw)
    return tuple(item.strip() for item in str(raw).split(",") if item.strip())


def _wrong(raw: Any, described: str) -> Any:
    raise ValueError(f"must be {described}, not {type(raw).__name__}")
