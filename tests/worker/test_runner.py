"""worker.runner in process (fakeredis, the simulator over real HTTP): the order of a job's end."""

from __future__ import annotations

import fakeredis
import pytest
import requests

from relay.conversations import Conversations
from relay.jobs import JobStore
from worker.publisher import Publisher
from worker.runner import JobContext, run_job
from worker.upstream import Upstream

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("publisher", [False, True], ids=["direct", "publisher"])
def test_a_reply_is_saved_as_a_parent_before_the_job_ends(simulator: str, publisher: bool):
    """A client that has seen [DONE] may send its follow-up at once, naming this reply as its
    parent: the reply must already be stored by then (it was saved just after the end, and a
    quick follow-up was refused with message_not_found)."""
    redis = fakeredis.FakeRedis()
    store = JobStore(redis, retention=60, max_age=600)
    conversations = Conversations(redis, ttl=600)
    body, turn = conversations.prepare({"model": "m", "prompt": "hi",
                                        "simulator": {"reply": "hello there"}})  # fmt: skip
    job_id = store.create(body, turn)
    seen_at_end: list[dict | None] = []
    complete = store.complete

    def completing(*args, **kwargs):
        seen_at_end.append(conversations.get(turn.message_id))
        return complete(*args, **kwargs)

    store.complete = completing  # type: ignore[method-assign]
    with requests.Session() as session:
        ctx = JobContext(
            store=store, session=session, upstream=Upstream(base_url=simulator), worker_id="w",
            conversations=conversations, publisher=Publisher(store) if publisher else None,
        )  # fmt: skip
        run_job(ctx, job_id)
    assert store.status(job_id)["status"] == "completed"
    (reply,) = seen_at_end
    assert reply is not None and reply["content"] == "hello there"
