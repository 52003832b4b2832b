"""The models the relay can serve, as OpenAI's ``GET /v1/models`` lists them.

Chat front ends (Open WebUI, LibreChat, LobeChat, Chatbox, editors' assistants) ask this first
and offer what it lists. The list is every model an upstream lists (its own ``/v1/models``) that
a route takes, plus every model a route names exactly. Each upstream's list is cached in Redis
(shared by every web process) with the base URL it came from, and fetched again in the
background once it is a minute old; an upstream that is down keeps its last list, and says so
in the log, never in a 500. An upstream given another base URL (a reloaded routes file) is
fetched anew: the old server's list is not its.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import orjson
import requests
from redis.exceptions import RedisError

from relay.core import keys
from relay.core.connections import Client
from relay.core.routes import Routes, Upstream

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 60.0  # a list older than this is fetched again, in the background
KEEP_SECONDS = 7 * 24 * 3600  # an upstream down this long has its last list forgotten
FETCH_TIMEOUT = 3.0  # seconds: a list is small; an upstream this slow is treated as down
MAX_MODELS = 1000  # per upstream: a list, not a payload
MAX_ID_CHARS = 256


class ModelCatalog:
    """One web process's view of the upstreams' model lists."""

    def __init__(self, redis: Client, routes: Routes) -> None:
        self.redis = redis
        self.routes = routes
        self.session = requests.Session()
        self._fetching: dict[str, gevent.Greenlet] = {}
        self._next_try: dict[str, float] = {}  # after a failure: not before then

    def listing(self) -> list[dict[str, Any]]:
        """Every model the relay serves, in OpenAI's shape, sorted by id."""
        found: dict[str, dict[str, Any]] = {}
        for upstream in self.routes.upstreams.values():
            for model_id, created in self._models_of(upstream):
                if model_id not in found and self.routes.targets(model_id):
                    found[model_id] = _entry(model_id, created, upstream.name)
        for model_id, upstream_name in self.routes.declared_models():
            found.setdefault(model_id, _entry(model_id, 0, upstream_name))
        return [found[model_id] for model_id in sorted(found)]

    def find(self, model_id: str) -> dict[str, Any] | None:
        return next((m for m in self.listing() if m["id"] == model_id), None)

    def _models_of(self, upstream: Upstream) -> list[tuple[str, int]]:
        """The upstream's cached list; fetched now if there is none, again in the background
        if it is stale."""
        cached = self._cached(upstream)
        if cached is None:
            return self._refresh(upstream) or []
        models, fetched_at = cached
        if time.time() - fetched_at > REFRESH_SECONDS:
            self._refresh_later(upstream)
        return models

    def _cached(self, upstream: Upstream) -> tuple[list[tuple[str, int]], float] | None:
        try:
            raw = self.redis.get(keys.upstream_models(upstream.name))
        except RedisError as exc:
            logger.warning("could not read %s's model list from Redis: %s", upstream.name, exc)
            return None
        if not raw:
            return None
        data = orjson.loads(raw)
        if data.get("base_url") != upstream.base_url:
            return None  # another server's list: the routes file gave the name a new one
        return [(m, int(c)) for m, c in data["models"]], float(data["fetched_at"])

    def _refresh_later(self, upstream: Upstream) -> None:
        running = self._fetching.get(upstream.name)
        if running is None or running.dead:
            self._fetching[upstream.name] = gevent.spawn(self._refresh, upstream)

    def _refresh(self, upstream: Upstream) -> list[tuple[str, int]] | None:
        """Fetch and cache the upstream's list; None (and a log line) if it is unavailable."""
        if time.monotonic() < self._next_try.get(upstream.name, 0.0):
            return None
        try:
            models = fetch(self.session, upstream)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the last list in place
            self._next_try[upstream.name] = time.monotonic() + REFRESH_SECONDS
            logger.warning(
                "upstream %s: model list unavailable (%s); keeping its last one",
                upstream.name, exc,
            )  # fmt: skip
            return None
        self._next_try.pop(upstream.name, None)
        record = orjson.dumps(
            {"fetched_at": time.time(), "base_url": upstream.base_url, "models": models}
        )
        try:
            self.redis.set(keys.upstream_models(upstream.name), record, ex=KEEP_SECONDS)
        except RedisError as exc:
            logger.warning("could not cache %s's model list: %s", upstream.name, exc)
        return models


def fetch(session: requests.Session, upstream: Upstream) -> list[tuple[str, int]]:
    """The upstream's ``GET /models``: (id, created) of each model, bounded."""
    headers = dict(upstream.headers)
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    response = session.get(
        upstream.models_url, headers=headers, timeout=(upstream.connect_timeout, FETCH_TIMEOUT)
    )
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}")
    data = response.json().get("data")
    if not isinstance(data, list):
        raise ValueError("no 'data' list in its answer")
    models = []
    for item in data[:MAX_MODELS]:
        model_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(model_id, str) and 0 < len(model_id) <= MAX_ID_CHARS:
            created = item.get("created")
            models.append((model_id, created if isinstance(created, int) else 0))
    return models


def _entry(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
