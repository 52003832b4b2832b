"""follow(): how one viewer's stream ends when its job vanishes or its process shuts down."""

from __future__ import annotations

import itertools
import json

import fakeredis

from relay.core.jobs import JobStore
from relay.web.fanout import Viewer
from relay.web.streaming import follow


class NoHub:
    """follow() only detaches from the hub at the end."""

    def __init__(self) -> None:
        self.detached: list[Viewer] = []

    def detach(self, viewer: Viewer) -> None:
        self.detached.append(viewer)


def a_viewer_of_a_new_job() -> tuple[fakeredis.FakeRedis, JobStore, Viewer, NoHub]:
    redis = fakeredis.FakeRedis()
    store = JobStore(redis, retention=60, max_age=600)
    job_id = store.create({"model": "m", "messages": []})
    return redis, store, Viewer(job_id, 8), NoHub()


def test_a_viewer_whose_job_vanishes_gets_an_error_and_done_not_keep_alives_for_ever():
    redis, store, viewer, hub = a_viewer_of_a_new_job()
    events = follow(store, hub, viewer, 0, idle=0.01)  # type: ignore[arg-type]
    assert next(events) is None  # a keep-alive while the job exists
    redis.flushdb()  # Redis restarted without persistence
    rest = [e for e in itertools.islice(events, 10) if e is not None]  # bounded: never hangs
    assert [e.seq for e in rest] == [1, 2] and rest[-1].done
    assert json.loads(rest[0].data)["error"]["code"] == "job_lost"
    assert hub.detached == [viewer]


def test_a_closed_viewer_stops_without_done():
    _, store, viewer, hub = a_viewer_of_a_new_job()
    events = follow(store, hub, viewer, 0, idle=5)  # type: ignore[arg-type]
    viewer.close()
    assert list(events) == [] and hub.detached == [viewer]
