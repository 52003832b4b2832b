"""worker.runner in process (a real redis-server, the simulator over real HTTP): the order of a
job's end, and the event loop kept free while a long reply is counted."""

from __future__ import annotations

import json
import logging
import socket
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests

from relay.core import keys, queue, routes, tokens
from relay.core.connections import connect
from relay.core.conversations import Conversations, reply_cost
from relay.core.jobs import Claim, JobStore, SentClaim
from relay.core.settings import Settings
from tests.conftest import free_port, simulator_process, wait_for
from tests.helpers import chat_body, stored_message
from worker import http1, runner
from worker.publisher import Publisher
from worker.runner import JobContext, run_job
from worker.upstream import Session, Upstream

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
    tokens.load()  # as the worker does at start (loading holds the GIL for ~0.2 s)
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


# -- the head start: a fresh queue entry's request goes upstream while its claim is on its way --


@pytest.fixture
def own_simulator(log_dir: Path) -> Iterator[str]:
    """A simulator of this test's own (its stream counts are this test's alone)."""
    with simulator_process(log_dir, "sim-head-start", "--interval", "0.05") as (base, _):
        yield base


def worker_context(
    redis_url: str, session: requests.Session, upstream: str, **options
) -> JobContext:
    redis = connect(redis_url)
    store = JobStore(redis, retention=60, max_age=600)
    return JobContext(store=store, session=session, upstream=Upstream(base_url=upstream),
                      worker_id="w-head", conversations=Conversations(redis, ttl=600),
                      publisher=Publisher(store), **options)  # fmt: skip


def sim_requests(base: str) -> int:
    return len(requests.get(f"{base}/_sim/requests", timeout=5).json())


def assert_ended_unpublished(ctx: JobContext, job_id: str, events_before: int, sim: str) -> None:
    """A job cancelled before its claim: nothing of its upstream request published, the
    upstream's stream closed (not left running, not pooled), its entry acknowledged."""
    status = ctx.store.status(job_id)
    assert status["status"] == "cancelled" and status["events"] == events_before
    assert ctx.store.redis.llen(keys.claimed(ctx.worker_id)) == 0
    stats = f"{sim}/_sim/stats"
    wait_for(lambda: requests.get(stats, timeout=5).json()["active_streams"] == 0, 5,
             "the upstream's stream to be closed")  # fmt: skip


def keep_a_connection(ctx: JobContext) -> None:
    """Run one job, which leaves its upstream connection kept for the next."""
    job_id = ctx.store.create(chat_body("hi"))
    run_job(ctx, job_id, queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1))


def test_a_fresh_entry_goes_upstream_before_its_claim_is_answered(own_simulator, redis_url):
    """The claim's round trip is off the first token's path: when the worker reads the claim's
    answer, the upstream has its request already. The job then runs as any other, and its
    entry (the request included) leaves the claimed list at its end."""
    with requests.Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        job_id = ctx.store.create({**chat_body("hi", reply="all good")})
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        assert entry is not None and entry.job_id == job_id and entry.request
        seen_at_answer: list[int] = []
        answer = SentClaim.answer

        def answering(self: SentClaim) -> Claim:
            seen_at_answer.append(sim_requests(own_simulator))
            return answer(self)

        claim_and_load = ctx.store.claim_and_load
        ctx.store.claim_and_load = None  # type: ignore[assignment,method-assign]
        try:
            SentClaim.answer = answering  # type: ignore[method-assign]
            run_job(ctx, job_id, entry)
        finally:
            SentClaim.answer = answer  # type: ignore[method-assign]
            ctx.store.claim_and_load = claim_and_load  # type: ignore[method-assign]
        assert seen_at_answer == [1]
        status = ctx.store.status(job_id)
        assert status["status"] == "completed" and status["text"] == "all good"
        assert status["attempts"] == 1
        assert ctx.store.redis.llen(keys.claimed(ctx.worker_id)) == 0


def test_the_claim_goes_out_just_before_the_upstream_request(own_simulator, redis_url):
    """The claim is sent first and the upstream request written right after it, both before
    either answer is awaited: an upstream that answers at once (taking the worker's core)
    finds the claim's round trip already under way."""
    with Session() as session:  # the relay's own: plain HTTP through worker.http1
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        job_id = ctx.store.create(chat_body("hi", reply="in order"))
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        order: list[str] = []
        claim_sent = ctx.store.claim_sent
        checkout, awaited = http1.Pool._checkout, http1.Pool._answer

        class Recorded:
            """The upstream connection, saying when the request is written on it."""

            def __init__(self, sock: socket.socket) -> None:
                self._sock = sock

            def __getattr__(self, name: str) -> object:
                return getattr(self._sock, name)

            def sendall(self, data: bytes) -> None:
                self._sock.sendall(data)
                order.append("request written")

        def sending_claim(*args: object) -> SentClaim:
            order.append("claim sent")
            return claim_sent(*args)  # type: ignore[arg-type]

        def checking_out(self: http1.Pool, *args: object) -> tuple[object, bool]:
            sock, reused = checkout(self, *args)  # type: ignore[arg-type]
            return Recorded(sock), reused

        def awaiting(self: http1.Pool, sock: object, key: object) -> http1.Answer:
            order.append("answer awaited")
            return awaited(self, sock._sock, key)  # type: ignore[attr-defined,arg-type]

        ctx.store.claim_sent = sending_claim  # type: ignore[method-assign]
        try:
            http1.Pool._checkout, http1.Pool._answer = checking_out, awaiting  # type: ignore[method-assign,assignment]
            run_job(ctx, job_id, entry)
        finally:
            http1.Pool._checkout, http1.Pool._answer = checkout, awaited  # type: ignore[method-assign]
        assert order == ["claim sent", "request written", "answer awaited"]
        assert ctx.store.status(job_id)["text"] == "in order"


def test_the_claim_loop_sends_a_fresh_jobs_request_and_claim_before_its_greenlet_runs(
    own_simulator, redis_url
):
    """With a kept connection idle, send_early writes the request and sends the claim at once
    (the upstream has it and the job is claimed before run_job is called); the job then runs
    from them, claimed once, and its entry leaves the claimed list."""
    with Session() as session:  # plain HTTP through worker.http1: connections are kept
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        keep_a_connection(ctx)
        job_id = ctx.store.create(chat_body("hi", reply="early"))
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        early = runner.send_early(ctx, entry)
        assert early is not None and early.sent is not None
        wait_for(lambda: sim_requests(own_simulator) == 2, 5, "the early request")
        wait_for(lambda: ctx.store.redis.hget(keys.job(job_id), "status") == b"running", 5,
                 "the early claim")  # fmt: skip
        claim_and_load, opening = ctx.store.claim_and_load, runner._open_with_retries
        unread_at_stream: list[bool] = []

        def open_with_retries(*args: Any) -> Any:
            unread_at_stream.append(args[-1].pending is not None)  # its head start
            return opening(*args)

        ctx.store.claim_and_load = None  # type: ignore[assignment,method-assign]
        runner._open_with_retries = open_with_retries  # type: ignore[assignment]
        try:
            run_job(ctx, job_id, entry, early)
        finally:
            ctx.store.claim_and_load = claim_and_load  # type: ignore[method-assign]
            runner._open_with_retries = opening
        # The job's set-up ran while the upstream worked: its answer was read only then.
        assert unread_at_stream == [True]
        status = ctx.store.status(job_id)
        assert status["status"] == "completed" and status["text"] == "early"
        assert status["attempts"] == 1 and sim_requests(own_simulator) == 2
        assert ctx.store.redis.llen(keys.claimed(ctx.worker_id)) == 0
        assert session.plain.connects == 1


def test_the_first_chunk_is_counted_once_it_is_sent(own_simulator, redis_url):
    """Its counters wait until the first chunk's publish is out (they are not on its path),
    and are written all the same: one first-chunk sample and one upstream time to first token,
    and the upstream that served the job."""
    with Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        job_id = ctx.store.create(chat_body("hi", reply="counted"))
        run_job(ctx, job_id, queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1))
        written = {k.decode(): v.decode() for k, v in
                   ctx.store.redis.hgetall(keys.METRICS).items()}  # fmt: skip
    buckets = sum(int(v) for k, v in written.items() if k.startswith("first_chunk_bucket:"))
    assert buckets == 1 and 0 < float(written["first_chunk_sum"]) < 5
    (ttft,) = [k for k in written if k.startswith("upstream_ttft_count:")]
    assert written[ttft] == "1"


def test_a_jobs_log_line_names_its_upstream_once_its_first_chunk_is_out(
    own_simulator, redis_url, caplog
):
    """A job's log line waits for its first chunk to be published (a log line costs the
    worker's core about as much as a Redis round trip, on the first token's path), and says
    which upstream serves it."""
    published_then: list[int] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "streaming" in record.getMessage():
                published_then.append(int(ctx.store.status(job_id)["events"]))

    seen = Seen()
    logging.getLogger("worker.runner").addHandler(seen)
    try:
        with Session() as session, caplog.at_level(logging.INFO, "worker.runner"):
            ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
            job_id = ctx.store.create(chat_body("hi", reply="logged"))
            run_job(ctx, job_id, queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1))
    finally:
        logging.getLogger("worker.runner").removeHandler(seen)
    lines = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
    assert f"job {job_id} streaming from upstream default (attempt 1)" in lines
    assert published_then and published_then[0] >= 1
    assert not any("started" in line for line in lines)


def test_an_upstreams_silence_is_logged_once_unless_a_chunk_came_first(caplog):
    """The silence timer logs once, from a greenlet of its own; the first chunk calls it off,
    and 0 seconds turns it off."""
    with caplog.at_level(logging.INFO, "worker.runner"):
        with runner._silence_logged("job_a", 0.05, "local"):
            gevent.sleep(0.3)  # time passing is what is under test
        with runner._silence_logged("job_b", 0.05, "local") as heard:
            heard()
            gevent.sleep(0.3)
        with runner._silence_logged("job_c", 0, "local"):
            gevent.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if "no chunk yet" in r.getMessage()]
    assert lines == [
        "job job_a: no chunk yet from upstream local, 0.05 s after the request; still waiting"
    ]
    assert [r.job_id for r in caplog.records if "no chunk yet" in r.getMessage()] == ["job_a"]


def test_an_early_start_whose_claim_fails_has_its_request_closed_unread(own_simulator, redis_url):
    """The claim loop sent the request and the claim of a job cancelled meanwhile: the claim's
    answer (read first) says so, nothing is published, the upstream's stream is closed and
    the entry acknowledged."""
    with Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        keep_a_connection(ctx)
        job_id = ctx.store.create(chat_body("hi", tokens=400))  # 20 s at 0.05 s a token
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        assert ctx.store.cancel(job_id)[0]
        events_before = ctx.store.status(job_id)["events"]
        early = runner.send_early(ctx, entry)
        assert early is not None and early.sent is not None
        run_job(ctx, job_id, entry, early)
        assert_ended_unpublished(ctx, job_id, events_before, own_simulator)


def test_without_a_kept_connection_only_the_claim_goes_out_early(own_simulator, redis_url):
    """No kept connection is idle: the claim loop sends the claim alone (a connect is never
    its to wait for); the job's greenlet then sends the request it prepared and reads that
    claim, without preparing or claiming again."""
    with Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        job_id = ctx.store.create(chat_body("hi"))
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        early = runner.send_early(ctx, entry)
        assert early is not None and early.sent is None and early.claim is not None
        assert sim_requests(own_simulator) == 0
        wait_for(lambda: ctx.store.redis.hget(keys.job(job_id), "status") == b"running", 5,
                 "the early claim")  # fmt: skip
        preparing, runner._head_start_target = runner._head_start_target, None  # type: ignore[assignment]
        claim_sent, ctx.store.claim_sent = ctx.store.claim_sent, None  # type: ignore[assignment,method-assign]
        try:
            run_job(ctx, job_id, entry, early)
        finally:
            runner._head_start_target = preparing
            ctx.store.claim_sent = claim_sent  # type: ignore[method-assign]
        status = ctx.store.status(job_id)
        assert status["status"] == "completed" and status["attempts"] == 1
        assert sim_requests(own_simulator) == 1
        assert ctx.store.redis.llen(keys.claimed(ctx.worker_id)) == 0


def test_an_early_start_abandoned_closes_its_request_and_frees_its_connection(
    own_simulator, redis_url
):
    """A job whose greenlet was killed before it ran (a cancel order in that instant): the
    upstream's stream is closed and the claim's Redis connection goes back to the pool."""
    with Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        keep_a_connection(ctx)
        ctx.store.create(chat_body("hi", tokens=400))  # 20 s at 0.05 s a token
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        free = ctx.store.redis.connection_pool.pool  # the blocking pool's free slots
        before = free.qsize()
        early = runner.send_early(ctx, entry)
        assert early is not None and early.sent is not None
        assert free.qsize() == before - 1  # the claim's, reply unread
        early.abandon()
        early.abandon()  # as often as it is called
        assert free.qsize() == before
        stats = f"{own_simulator}/_sim/stats"
        wait_for(lambda: requests.get(stats, timeout=5).json()["active_streams"] == 0, 5,
                 "the upstream's stream to be closed")  # fmt: skip


def test_an_early_claim_abandoned_alone_frees_its_connection(own_simulator, redis_url):
    """Without a kept connection the claim loop sent only the claim: a greenlet killed before
    it ran gives that claim's Redis connection back all the same (the claim loop links the
    abandon to every early start)."""
    with Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        ctx.store.create(chat_body("hi"))
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        free = ctx.store.redis.connection_pool.pool
        before = free.qsize()
        early = runner.send_early(ctx, entry)
        assert early is not None and early.sent is None and early.claim is not None
        assert free.qsize() == before - 1
        early.abandon()
        assert free.qsize() == before and sim_requests(own_simulator) == 0


def test_an_unreachable_upstream_still_has_its_job_claimed_and_failed(redis_url):
    """No request was written, so the claim is sent on its own: the job is claimed once and
    ends with the upstream's failure, its entry acknowledged."""
    with requests.Session() as session:
        ctx = worker_context(redis_url, session, f"http://127.0.0.1:{free_port()}/v1",
                             max_retries=0)  # fmt: skip
        job_id = ctx.store.create(chat_body("hi"))
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        assert entry is not None and entry.request
        run_job(ctx, job_id, entry)
        status = ctx.store.status(job_id)
        assert status["status"] == "failed" and status["attempts"] == 1
        assert status["error"]["code"] == "upstream_unreachable"
        assert ctx.store.redis.llen(keys.claimed(ctx.worker_id)) == 0


def test_a_job_cancelled_while_queued_has_its_head_start_closed(own_simulator, redis_url):
    """The request went upstream before the claim said the job was no longer queued: nothing
    of it is published, the upstream's stream is closed (not left running, not pooled), and
    the entry is acknowledged."""
    with requests.Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        job_id = ctx.store.create(chat_body("hi", tokens=400))  # 20 s at 0.05 s a token
        assert ctx.store.cancel(job_id)[0]
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        assert entry is not None and entry.job_id == job_id
        events_before = ctx.store.status(job_id)["events"]
        run_job(ctx, job_id, entry)
        assert sim_requests(own_simulator) == 1
        assert_ended_unpublished(ctx, job_id, events_before, own_simulator)


def test_the_claim_is_read_again_when_redis_lost_its_scripts(own_simulator, redis_url):
    with requests.Session() as session:
        ctx = worker_context(redis_url, session, f"{own_simulator}/v1")
        job_id = ctx.store.create(chat_body("hi", reply="still fine"))
        entry = queue.claim_next(ctx.store.redis, ctx.worker_id, timeout=1)
        ctx.store.redis.script_flush()  # as after a restart of Redis: EVALSHA says NOSCRIPT
        run_job(ctx, job_id, entry)
        status = ctx.store.status(job_id)
        assert status["status"] == "completed" and status["text"] == "still fine"
        assert status["attempts"] == 1


def context_for(**options) -> JobContext:
    """A context for deciding on a head start (nothing in it is called)."""
    return JobContext(store=None, session=None, upstream=Upstream(base_url="http://up/v1"),  # type: ignore[arg-type]
                      worker_id="w", conversations=None, publisher=None, **options)  # type: ignore[arg-type]  # fmt: skip


def fresh(request: dict | str, age: float = 0.0) -> queue.Entry:
    text = request if isinstance(request, str) else json.dumps(request)
    return queue.read_entry(queue.entry("job_" + "a" * 24, text, time.time() - age))


def test_only_a_fresh_entry_with_its_request_gets_a_head_start():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    sent, target = runner._head_start_target(context_for(), fresh(body))
    assert target.upstream.base_url == "http://up/v1"
    # What the claimed path would send: usage asked for, the client's own options kept.
    assert sent == {**body, "stream_options": {"include_usage": True}}
    assert runner._head_start_target(context_for(), fresh(body, age=5)) is None
    assert runner._head_start_target(context_for(), fresh(body, age=-5)) is None  # a skewed clock
    assert runner._head_start_target(context_for(), fresh(body, age=-0.01)) is not None
    assert runner._head_start_target(context_for(), queue.read_entry("job_" + "a" * 24)) is None
    assert runner._head_start_target(context_for(), None) is None
    assert runner._head_start_target(context_for(), fresh("[1, 2]")) is None
    # Moderation must pass before anything goes upstream.
    assert runner._head_start_target(context_for(moderation=True), fresh(body)) is None
    # A request too big to ride along is read with the claim.
    big = {**body, "messages": [{"role": "user", "content": "x" * queue.INLINE_MAX}]}
    assert runner._head_start_target(context_for(), fresh(big)) is None


CAPPED = """
[upstreams.free]
base_url = "http://free/v1"
[upstreams.local]
base_url = "http://local/v1"
max_streams = 4
[[routes]]
model = "big"
upstreams = ["free"]
[[routes]]
model = "small"
upstreams = ["local", "free"]
"""


def test_a_capped_upstream_gets_no_head_start():
    """Taking one of a capped upstream's slots is a round trip of its own, after the claim."""
    ctx = context_for(routes=routes.parse(tomllib.loads(CAPPED), Settings(), {}))
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
    _, target = runner._head_start_target(ctx, fresh(body))
    assert target.upstream.name == "free"
    assert runner._head_start_target(ctx, fresh({**body, "model": "small"})) is None
    assert runner._head_start_target(ctx, fresh({**body, "model": "unknown"})) is None


def test_an_upstream_that_refuses_stream_options_never_gets_them():
    """Neither the relay's own ask for usage nor the client's: the request would be a 400."""
    table = routes.parse(tomllib.loads(CAPPED.replace(
        'base_url = "http://free/v1"', 'base_url = "http://free/v1"\nstream_options = false'
    )), Settings(), {})  # fmt: skip
    ctx = context_for(routes=table)
    body = {"model": "big", "messages": [], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent, target = runner._head_start_target(ctx, fresh(body))
    assert target.upstream.name == "free" and "stream_options" not in sent
    assert sent == {k: v for k, v in body.items() if k != "stream_options"}
    (local, _) = table.targets("small")
    assert runner._sent_to(local, body)["stream_options"] == {"include_usage": True}


def test_a_job_stored_without_a_model_gets_the_one_its_routes_imply():
    """RELAY_DEFAULT_MODEL (gpt-4o-mini) is routed nowhere here: the first route's model."""
    ctx = context_for(
        routes=routes.parse(tomllib.loads(CAPPED), Settings(), {}), default_model="gpt-4o-mini"
    )
    sent, target = runner._head_start_target(ctx, fresh({"messages": [], "stream": True}))
    assert sent["model"] == "big" and target.upstream.name == "free"
