"""worker.runner in process (a real redis-server, the simulator over real HTTP): the order of a
job's end, and the event loop kept free while a long reply is counted."""

from __future__ import annotations

import time

import gevent
import pytest
import requests

from relay.core.connections import connect
from relay.core.conversations import Conversations, reply_cost
from relay.core.jobs import JobStore
from tests.helpers import stored_message
from worker import runner
from worker.publisher import Publisher
from worker.runner import JobContext, run_job
from worker.upstream import Upstream

pytestmark = pytest.mark.timeout(30)


def test_a_reply_is_saved_as_a_parent_before_the_job_ends(simulator: str, redis_url: str):
    """A client that has seen [DONE] may send its follow-up at once, naming this reply as its
    parent: the reply must already be stored by then (it was saved just after the end, and a
    quick follow-up was refused with message_not_found)."""
    redis = connect(redis_url)
    store = JobStore(redis, retention=60, max_age=600)
    conversations = Conversations(redis, ttl=600)
    draft = conversations.prepare({"model": "m", "prompt": "hi",
                                   "simulator": {"reply": "hello there"}})  # fmt: skip
    turn = conversations.save(draft)
    job_id = store.create(draft.request, turn)
    seen_at_end: list[dict | None] = []
    complete = store.complete

    def completing(*args, **kwargs):
        seen_at_end.append(stored_message(conversations, turn.message_id))
        return complete(*args, **kwargs)

    store.complete = completing  # type: ignore[method-assign]
    with requests.Session() as session:
        ctx = JobContext(
            store=store, session=session, upstream=Upstream(base_url=simulator), worker_id="w",
            conversations=conversations, publisher=Publisher(store),
        )  # fmt: skip
        run_job(ctx, job_id)
    assert store.status(job_id)["status"] == "completed"
    (reply,) = seen_at_end
    assert reply is not None and reply["content"] == "hello there"


def test_a_long_reply_is_counted_without_holding_up_the_workers_other_jobs():
    """Counting a long reply's tokens takes tens of milliseconds of CPU; the other jobs'
    greenlets must keep running meanwhile."""
    text = "The relay keeps every reply. " * 27_000  # 0.8 MB: ~50 ms to count
    ticks: list[float] = []

    def tick() -> None:
        while True:
            ticks.append(time.perf_counter())
            gevent.sleep(0.001)

    ticker = gevent.spawn(tick)
    gevent.sleep(0.01)
    started = time.perf_counter()
    cost = runner._counted_off_the_loop(text)
    took = time.perf_counter() - started
    ticker.kill()
    assert cost == reply_cost(text)
    during = [started, *(t for t in ticks if t >= started), started + took]
    longest = max(b - a for a, b in zip(during, during[1:], strict=False))
    assert took > 0.02 and longest < took / 2, f"the loop stood still {longest:.3f}s of {took:.3f}s"
