"""The model catalog's cache of each upstream's list (on fakeredis): a list belongs to the
server it came from."""

from __future__ import annotations

import fakeredis

from relay.core.routes import Route, Routes, Upstream
from relay.web import models
from relay.web.models import ModelCatalog


def catalog(redis: fakeredis.FakeRedis, base_url: str) -> ModelCatalog:
    upstream = Upstream(base_url, name="x")
    return ModelCatalog(redis, Routes({"x": upstream}, (Route("*", ("x",)),), source="r.toml"))


def test_a_cached_list_is_not_shown_for_another_server_of_the_same_name(monkeypatch):
    """A routes file reloaded with a new base_url for an upstream: the old server's models are
    not listed as the new one's, even while the new one is down."""
    redis = fakeredis.FakeRedis()
    lists = {"http://one/v1": [("alpha", 1)], "http://two/v1": [("beta", 2)]}
    down: set[str] = set()

    def fetch(session: object, upstream: Upstream) -> list[tuple[str, int]]:
        if upstream.base_url in down:
            raise ConnectionError("refused")
        return lists[upstream.base_url]

    monkeypatch.setattr(models, "fetch", fetch)
    assert [m["id"] for m in catalog(redis, "http://one/v1").listing()] == ["alpha"]
    down.add("http://one/v1")  # the server it had is still cached while it is down
    assert [m["id"] for m in catalog(redis, "http://one/v1").listing()] == ["alpha"]
    down.add("http://two/v1")
    assert catalog(redis, "http://two/v1").listing() == []
    down.clear()
    assert [m["id"] for m in catalog(redis, "http://two/v1").listing()] == ["beta"]


def test_a_list_cached_without_its_server_is_fetched_again(monkeypatch):
    """Lists cached before they named their server are not trusted either."""
    redis = fakeredis.FakeRedis()
    redis.set("relay:{upstream:x}:models", b'{"fetched_at": 1e12, "models": [["old", 1]]}')
    monkeypatch.setattr(models, "fetch", lambda session, upstream: [("new", 2)])
    assert [m["id"] for m in catalog(redis, "http://one/v1").listing()] == ["new"]
