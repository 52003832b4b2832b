"""follow(): how one viewer's stream ends when its job vanishes or its process shuts down."""

from __future__ import annotations

import itertools
import json
import socket

import fakeredis
import gevent

from relay.core import keys
from relay.core.jobs import JobStore
from relay.web.fanout import Viewer
from relay.web.streaming import follow
from relay.web.streams import with_head


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


def test_a_log_behind_the_viewer_after_a_lost_subscription_ends_the_stream_at_once():
    """A failover to a replica that missed the last writes: no hole, no repeat, an error."""
    redis, store, viewer, hub = a_viewer_of_a_new_job()
    attempt = store.claim(viewer.job_id, "w1")
    events = [f'{{"n":{n}}}' for n in range(1, 6)]
    assert store.publish_many([(viewer.job_id, attempt, events, "")], run_each(redis)) == [5]
    stream = follow(store, hub, viewer, 0, idle=60)  # type: ignore[arg-type]
    assert [next(stream).seq for _ in range(5)] == [1, 2, 3, 4, 5]
    redis.ltrim(keys.events(viewer.job_id), 0, 2)  # the promoted replica had 3 of the 5
    redis.hset(keys.job(viewer.job_id), "seq", 3)
    viewer.resync(suspect=True)  # what the hub does once it has subscribed again
    with gevent.Timeout(5):  # not after the 60 s idle check
        rest = list(stream)
    assert [e.seq for e in rest] == [6, 7] and rest[-1].done
    assert json.loads(rest[0].data)["error"]["code"] == "log_rewound"


def run_each(redis: fakeredis.FakeRedis):
    """publish_many's ``execute`` on fakeredis: each command, errors as values."""

    def execute(commands: list[tuple]) -> list:
        replies = []
        for command in commands:
            try:
                replies.append(redis.execute_command(*command))
            except Exception as exc:  # noqa: BLE001
                replies.append(exc)
        return replies

    return execute


def corked(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return accepted, client


def test_a_streams_head_and_first_bytes_leave_together_then_nothing_is_held_back():
    """The first chunk is corked while the server writes it after the head (one packet, not
    two); asked for the next, the socket is uncorked, and stays so for the live events."""
    sock, peer = tcp_pair()
    with sock, peer:
        seen: list[bool] = []
        for _ in with_head(iter([b"first", b"second", b"third"]), sock):
            seen.append(corked(sock))
        assert seen == [True, False, False]


def test_a_stream_closed_after_its_first_chunk_is_uncorked_and_its_renderer_closed():
    sock, peer = tcp_pair()
    closed: list[bool] = []

    def render():
        try:
            yield b"first"
            yield b"second"
        finally:
            closed.append(True)  # where follow() lets its viewer go

    with sock, peer:
        rendered = render()  # held here too: closed by with_head, not by being dropped
        chunks = with_head(rendered, sock)
        assert next(chunks) == b"first" and corked(sock)
        chunks.close()  # the client went away while the head was being written
        assert not corked(sock) and closed == [True]


def test_no_socket_or_a_non_tcp_one_leaves_the_chunks_alone():
    assert list(with_head(iter([b"a", b"b"]), None)) == [b"a", b"b"]
    left, right = socket.socketpair()  # a Unix socket: no TCP_CORK
    with left, right:
        assert list(with_head(iter([b"a", b"b"]), left)) == [b"a", b"b"]
