"""Running one job: claim it, stream the upstream into the replay log, and always end it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.core import metrics, queue
from relay.core.chunks import completion_id, dumps, final_chunk, loads
from relay.core.conversations import Conversations, Turn, reply_cost
from relay.core.jobs import Claim, Ender, JobStore, SentClaim
from relay.core.routes import Routes, Target, Upstream

from . import http1, moderation
from .publisher import Publisher
from .reader import follow_chunks, keep_alive
from .slots import UpstreamSlots
from .upstream import UpstreamError, answer_of, open_stream, sanitize, send_on_kept

Response = requests.Response | http1.Answer

logger = logging.getLogger(__name__)

RETRY_FIRST_DELAY = 0.5  # seconds before the first retry of an upstream that refused
RETRY_MAX_DELAY = 10.0  # no wait longer than this, whatever the upstream's Retry-After says
# A queue entry older than this (by the queuing host's clock against the worker's) waits for its
# claim before its request goes upstream: the longer a job has queued, the likelier it was
# cancelled meanwhile.
HEAD_START_SECONDS = 1.0


class JobLost(Exception):
    """The job is no longer ours to write (it ended elsewhere or a janitor took it over)."""


class JobCancelled(Exception):
    """Raised inside a job's greenlet when the job was cancelled: stop reading the upstream."""


@dataclass
class JobContext:
    """What running a job needs, shared by every job of a worker process."""

    store: JobStore
    publisher: Publisher  # a job's publishes only queue; flush() waits for them
    conversations: Conversations
    session: requests.Session
    upstream: Upstream  # RELAY_UPSTREAM_BASE_URL's: moderation goes there
    worker_id: str
    routes: Routes | None = None  # where each model's jobs go (None: all to ``upstream``)
    slots: UpstreamSlots | None = None  # the streams each capped upstream carries
    max_retries: int = 2
    silence_log_seconds: float = 10.0  # a job with no first chunk this long is logged (0: never)
    default_model: str = ""
    include_usage: bool = True
    moderation: bool = False
    moderation_fail_open: bool = False
    moderation_model: str = ""
    # Upstream keys of routes replaced by a reload: kept from the viewers' error messages too.
    retired_keys: set[str] = field(default_factory=set)


def _delta_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """The first choice's new text and its finish_reason, if any."""
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            return (content if isinstance(content, str) else ""), choice.get("finish_reason")
    return "", None


def _open_with_retries(
    ctx: JobContext,
    job_id: str,
    body: dict,
    upstream: Upstream,
    tally: metrics.Tally,
    head_start: HeadStart | None = None,
) -> Response:
    """Retry what may pass (refused, 429, 5xx), only before anything was published. The first
    try may have been made already (``head_start``)."""
    attempt = 0
    while True:
        metrics.upstream_request(tally, upstream.name)
        try:
            if head_start is not None:
                started, head_start = head_start, None
                return started.result()
            return open_stream(ctx.session, upstream, body)
        except UpstreamError as exc:
            metrics.upstream_failure(tally, upstream.name, exc.status, exc.code)
            if not exc.retryable or attempt >= ctx.max_retries:
                raise
            backoff = RETRY_FIRST_DELAY * 2**attempt
            delay = min(
                exc.retry_after if exc.retry_after is not None else backoff, RETRY_MAX_DELAY
            )
            logger.info("job %s: upstream %s, retrying in %.1fs", job_id, exc.code, delay)
            attempt += 1
            gevent.sleep(delay)


def _upstream_request(ctx: JobContext, body: dict) -> tuple[dict, bool]:
    """The body to send upstream, and whether the client wants the usage chunk relayed.

    The relay asks for usage on every job so that it can store it; clients that did not ask
    (a streamed request without ``stream_options.include_usage``) do not get the extra chunk.
    A ``stream: false`` client always gets usage in its ``chat.completion``, as from OpenAI.
    """
    options = body.get("stream_options") or {}
    wants_usage = bool(options.get("include_usage")) or not body.get("stream")
    if ctx.include_usage:
        body = {**body, "stream_options": {**options, "include_usage": True}}
    return body, wants_usage


def _default_model(ctx: JobContext, body: dict) -> None:
    """A request that names no model asks for the relay's default (the web tier fills it in:
    this is for jobs queued by code of its own)."""
    if not body.get("model"):
        model = ctx.routes.implied_model() if ctx.routes is not None else ctx.default_model
        if model:
            body["model"] = model


def _sent_to(target: Target, body: dict) -> dict:
    """The body as the target's upstream gets it: under the route's name for the model, and
    without ``stream_options`` for an upstream that refuses them."""
    if not target.upstream.stream_options and "stream_options" in body:
        body = {k: v for k, v in body.items() if k != "stream_options"}
    return {**body, "model": target.model} if target.model else body


def _is_usage_only(chunk: dict[str, Any]) -> bool:
    return not chunk.get("choices") and bool(chunk.get("usage"))


def _after_first_chunk(
    ctx: JobContext, job_id: str, attempt: int, tally: metrics.Tally, upstream: str
) -> None:
    """What waits for the first chunk to be on its way (it may run in an event-loop callback,
    which must not wait for Redis): the job's log line, its counters so far, and which
    upstream serves it. A lost sample is better than a stalled stream."""

    def write() -> None:
        logger.info(
            "job %s streaming from upstream %s (attempt %d)",
            job_id,
            upstream,
            attempt,
            extra={"job_id": job_id},
        )  # a greenlet of its own: not in the job's context
        ctx.publisher.sent(job_id, attempt)
        with contextlib.suppress(RedisError):
            tally.flush(ctx.store.redis)
        if ctx.routes is not None and ctx.routes.from_file:
            with contextlib.suppress(RedisError):
                ctx.store.served_by(job_id, upstream)

    gevent.spawn(write)


def _targets(ctx: JobContext, model: str) -> list[Target]:
    if ctx.routes is None:
        return [Target(ctx.upstream, model)]
    targets = ctx.routes.targets(model)
    if not targets:  # the web tier refuses these; a routes file changed since the POST
        raise UpstreamError(
            f"The model {model!r} does not exist or no upstream serves it.",
            type="invalid_request_error",
            code="model_not_found",
        )
    return targets


# Answers about the upstream, not the request: its key (401), its account's rights (403), the
# models it has (404). The next upstream has its own, so a revoked key or a model one server
# lacks does not fail every job of a route that names another.
_UPSTREAM_REFUSALS = (401, 403, 404)


def _falls_back(error: UpstreamError) -> bool:
    """A failure the next upstream of the route may not have: refused, silent, 429, 5xx, or
    the upstream's own refusal (401, 403, 404); never the request's (400, 413, 422...)."""
    return (
        error.retryable
        or error.code in ("upstream_timeout", "upstream_unreachable")
        or error.status in _UPSTREAM_REFUSALS
    )


def _follow(
    response: Response, relay: Any, upstream: Upstream, relayed: Any, tally: metrics.Tally,
    flush: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    try:  # publishing only queues, so chunks are handled from the event loop
        if follow_chunks(response, relay, upstream.read_timeout, flush):
            keep_alive(response)  # the next job to this upstream skips the handshake
    except UpstreamError as exc:
        metrics.upstream_failure(tally, upstream.name, exc.status, exc.code)
        raise
    finally:
        response.close()
        metrics.count(tally, "deltas", sum(1 for part in relayed.parts if part))


@contextlib.contextmanager
def _silence_logged(job_id: str, seconds: float, upstream: str) -> Iterator[Callable[[], None]]:
    """Log once if ``upstream`` has sent the job no chunk ``seconds`` from now (its request is
    sent, or about to be); yields what calls that off (cheap enough for the first chunk's path,
    and callable from an event-loop callback). A job's first line is otherwise written with its
    first chunk: a slow or silent upstream would leave nothing in the log until the read timeout
    failed the job, which takes a minute by default."""
    if seconds <= 0:
        yield lambda: None
        return

    def write() -> None:
        logger.info(
            "job %s: no chunk yet from upstream %s, %g s after the request; still waiting",
            job_id, upstream, seconds, extra={"job_id": job_id},
        )  # fmt: skip

    timer = gevent.get_hub().loop.timer(seconds)
    timer.start(gevent.spawn, write)  # logging may wait for a lock: not in the event loop
    try:
        yield timer.stop
    finally:
        timer.close()


@contextlib.contextmanager
def _slot(ctx: JobContext, job_id: str, upstream: Upstream, wait: bool) -> Iterator[bool]:
    """One of a capped upstream's stream slots for the job, for as long as it streams: True
    once taken; False at once when the upstream is full and ``wait`` is off."""
    if ctx.slots is None or upstream.max_streams <= 0:
        yield True
        return
    if not ctx.slots.take(upstream, job_id, wait=wait):
        yield False
        return
    try:
        yield True
    finally:
        ctx.slots.give_back(upstream, job_id)


@dataclass
class HeadStart:
    """A job's first upstream request, sent before its claim was answered; its answer read
    already, or (``pending``) when the job first needs it."""

    target: Target
    sent_at: float
    response: Response | None = None
    error: UpstreamError | None = None
    pending: http1.Sent | None = None

    def result(self) -> Response:
        """The open response, or the request's failure (raised)."""
        if self.pending is not None:
            sent, self.pending = self.pending, None
            try:
                self.response = answer_of(self.target.upstream, sent)
            except UpstreamError as exc:
                self.error = exc
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response

    def close(self) -> None:
        if self.pending is not None:
            self.pending.close()
        if self.response is not None:
            self.response.close()


def _head_start_target(ctx: JobContext, entry: queue.Entry | None) -> tuple[dict, Target] | None:
    """The request to send upstream before the claim's answer, and where: only for a fresh
    entry that carries its request, to an upstream without a cap (taking a slot is a round trip
    of its own), and without moderation (which must pass first)."""
    if entry is None or not entry.request or ctx.moderation:
        return None
    if abs(time.time() - entry.queued_at) >= HEAD_START_SECONDS:
        return None  # (a host's clock may be a little ahead: the entry's time is rounded up, too)
    body = loads(entry.request)
    if not isinstance(body, dict):
        return None
    _default_model(ctx, body)
    try:
        target = _targets(ctx, body.get("model") or "")[0]
    except UpstreamError:
        return None  # the job fails as usual, once claimed
    if target.upstream.max_streams > 0:
        return None
    body, _ = _upstream_request(ctx, body)
    return _sent_to(target, body), target


@dataclass
class Early:
    """A fresh job's first upstream request as the claim loop prepared it (:func:`send_early`):
    its body and where it goes, the job's claim sent, and, when a kept connection was idle, the
    request written there, all before the job's greenlet started."""

    body: dict
    target: Target
    claim: SentClaim
    sent_at: float = 0.0
    sent: http1.Sent | None = None

    def abandon(self) -> None:
        """The job's greenlet never read them (it was killed before it started): drop the
        claim's reply and close the request. Nothing once they were read."""
        if self.sent is not None:
            self.sent.close()
        self.claim.drop()


def send_early(ctx: JobContext, entry: queue.Entry) -> Early | None:
    """For the claim loop: a fresh entry's claim sent, then its upstream request written on a
    kept connection, before the job's greenlet is spawned (which first waits for a turn of the
    event loop: 0.07-0.1 ms on the first token's path, on the benchmark machine). When no kept
    connection is idle, the request only prepared (the job's greenlet sends it); None when the
    job gets no head start (:func:`_head_start_target`) or preparing it failed."""
    try:
        prepared = _head_start_target(ctx, entry)
        if prepared is None:
            return None
        early = Early(*prepared, ctx.store.claim_sent(entry.job_id, ctx.worker_id))
    except Exception:  # never the claim loop's to fail: the job's greenlet meets it again
        logger.debug("job %s: no early start", entry.job_id, exc_info=True)
        return None
    try:
        early.sent_at = time.time()
        early.sent = send_on_kept(ctx.session, early.target.upstream, early.body)
    except Exception:  # the job's greenlet sends the request, and meets what failed
        logger.debug("job %s: no early request", entry.job_id, exc_info=True)
    return early


def _claim(
    ctx: JobContext, job_id: str, entry: queue.Entry | None, early: Early | None = None
) -> tuple[Claim, HeadStart | None]:
    """Claim the job; for a fresh entry that carries its request, with its first upstream
    request sent right after the claim, before the claim's answer is read (a round trip off
    the first token's path), or both sent by the claim loop already (``early``).

    The claim goes first: the upstream may answer before a process that shares its core gets
    the core back, and the first chunk then waits for the claim's round trip (RESULTS.md). Its
    reply is read before anything is published, so nothing is published before the job is
    ours. A job that turns out not to be queued any more (cancelled, expired, taken) has its
    upstream request closed unread.
    """
    if early is not None and early.sent is not None:
        return _claim_early(ctx, early)
    prepared = (early.body, early.target) if early is not None else _head_start_target(ctx, entry)
    if prepared is None:
        return ctx.store.claim_and_load(job_id, ctx.worker_id), None
    sent, target = prepared
    head_start = HeadStart(target, 0.0)
    sent_claim = early.claim if early is not None else None
    try:
        if sent_claim is None:
            sent_claim = ctx.store.claim_sent(job_id, ctx.worker_id)
        head_start.sent_at = time.time()
        try:
            head_start.response = open_stream(ctx.session, target.upstream, sent)
        except UpstreamError as exc:
            head_start.error = exc
        claim = sent_claim.answer()
    except BaseException:
        if sent_claim is not None:
            sent_claim.drop()
        head_start.close()
        raise
    if not claim.attempt:
        head_start.close()
        return claim, None
    return claim, head_start


def _claim_early(ctx: JobContext, early: Early) -> tuple[Claim, HeadStart | None]:
    """:func:`_claim` for a job whose request and claim the claim loop sent. The claim's reply
    is read now (Redis answers before the upstream does), the upstream's answer when the job's
    stream starts: what comes between (the job's set-up) runs while the upstream works, off the
    first token's path."""
    assert early.sent is not None
    try:
        claim = early.claim.answer()
    except BaseException:
        early.abandon()
        raise
    if not claim.attempt:
        early.abandon()
        return claim, None
    return claim, HeadStart(early.target, early.sent_at, pending=early.sent)


@dataclass
class _Relayed:
    """What a job's stream has relayed so far."""

    parts: list[str]
    finish_reason: str | None = None
    usage: dict | None = None
    published: int = 0


def _stream(
    ctx: JobContext,
    job_id: str,
    attempt: int,
    body: dict,
    turn: Turn | None,
    created_at: float,
    ender: Ender,
    head_start: HeadStart | None = None,
) -> None:
    """Relay the upstream's chunks; raises UpstreamError or JobLost, else completes the job.

    The job goes to the first upstream of its model's route; if that one fails before the first
    chunk was published (refused, timed out, 429, 5xx after its retries; 401, 403, 404), to the
    next. Once a chunk is out, the job stays where it is: viewers see one clean stream.
    """
    tally = ender.tally
    body, wants_usage = _upstream_request(ctx, body)
    targets = _targets(ctx, body.get("model") or "")
    relayed = _Relayed(parts=[])
    public_id = completion_id(job_id)
    sent_at = 0.0
    first_at: list[float] = []  # when the first chunk was published, until it is counted
    flushed = False  # the first bytes' publishes were sent: count at once from then on

    def count_first() -> None:
        now = first_at.pop()
        metrics.observe_first_chunk(tally, now - created_at)
        metrics.upstream_first_token(tally, serving, now - sent_at)
        _after_first_chunk(ctx, job_id, attempt, tally, serving)

    def flush() -> None:
        """The first bytes' publishes sent, then the first chunk counted: off its path."""
        nonlocal flushed
        ctx.publisher.send_now(job_id)
        flushed = True
        if first_at:
            count_first()

    def relay(data: str, chunk: dict[str, Any]) -> None:
        """One chunk: never waits (with a publisher, it runs in an event-loop callback)."""
        if chunk.get("id") != public_id:
            # One id for the whole stream, whatever the upstream (or a retry) called it; never
            # the reply's message id, which would let any viewer continue the conversation.
            chunk["id"] = public_id
            data = dumps(chunk)
        text, reason = _delta_text(chunk)
        relayed.parts.append(text)
        relayed.finish_reason = reason or relayed.finish_reason
        if chunk.get("usage"):
            relayed.usage = chunk["usage"]
            if _is_usage_only(chunk) and not wants_usage:
                return
        if not ctx.publisher.publish(job_id, attempt, [data], text, chunk):
            raise JobLost(job_id)
        relayed.published += 1
        if relayed.published == 1:
            heard()
            first_at.append(time.time())
            if flushed:
                count_first()

    for index, target in enumerate(targets):
        serving = target.upstream.name
        more = index + 1 < len(targets)
        try:
            with _slot(ctx, job_id, target.upstream, wait=not more) as taken:
                if not taken:  # at its cap, and the route has another upstream
                    metrics.upstream_fallback(tally, serving)
                    continue
                started, head_start = (head_start, None) if index == 0 else (None, head_start)
                sent_at = started.sent_at if started is not None else time.time()
                sent = _sent_to(target, body)
                with _silence_logged(job_id, ctx.silence_log_seconds, serving) as heard:
                    response = _open_with_retries(
                        ctx, job_id, sent, target.upstream, tally, started
                    )
                    _follow(response, relay, target.upstream, relayed, tally, flush)
            break
        except UpstreamError as exc:
            if relayed.published or not more or not _falls_back(exc):
                raise
            metrics.upstream_fallback(tally, serving)
            logger.warning(
                "job %s: upstream %s failed before the first chunk (%s); trying %s",
                job_id, serving, exc.code, targets[index + 1].upstream.name,
            )  # fmt: skip
            relayed.parts.clear()
            relayed.finish_reason, relayed.usage = None, None
    if relayed.finish_reason is None:
        # DESIGN.md: a stream that ends with neither a finish_reason nor [DONE] is a failure.
        raise UpstreamError(
            "The upstream closed the stream before it finished.", code="upstream_incomplete"
        )
    text = "".join(relayed.parts)
    _complete(ctx, job_id, attempt, turn, text, relayed.finish_reason, relayed.usage, ender)


def _complete(
    ctx: JobContext,
    job_id: str,
    attempt: int,
    turn: Turn | None,
    text: str,
    finish_reason: str,
    usage: dict | None,
    ender: Ender,
) -> None:
    """End the job as ``completed``, in this order:

    1. Wait until every event is in the log, so that the end comes after all of them.
    2. Save the reply in its conversation: a client that has seen ``[DONE]`` may name it as
       its next parent at once.
    3. Write the end (``[DONE]``) and the status.
    """
    if not ctx.publisher.flush(job_id, attempt):
        raise JobLost(job_id)
    if turn is not None:
        try:
            ctx.conversations.save_reply(turn, text, _counted_off_the_loop(text))
        except RedisError as exc:
            # On a cluster the conversation may live on a node that is failing over: the reply
            # still reaches its viewers, it just cannot be followed up.
            logger.warning("job %s: reply not saved in its conversation (%s)", job_id, exc)
    if not ctx.store.complete(job_id, attempt, finish_reason, usage, ender):
        raise JobLost(job_id)


OFF_LOOP_CHARS = 32_768  # ~1.5 ms of counting: less is not worth a thread hand-off


def _counted_off_the_loop(text: str) -> int:
    """A reply's tokens, counted in gevent's thread pool when it is long (tiktoken releases the
    GIL), so that the worker's other jobs are not held up meanwhile."""
    if len(text) < OFF_LOOP_CHARS:
        return reply_cost(text)
    return int(gevent.get_hub().threadpool.apply(reply_cost, (text,)))


def _refused_by_moderation(
    ctx: JobContext, job_id: str, attempt: int, body: dict, turn: Turn | None, ender: Ender
) -> bool:
    """Check the new input; if flagged, end the job with a refusal (``content_filter``).

    A moderation outage raises :class:`UpstreamError` (fail closed) unless configured to let
    the request through (fail open).
    """
    try:
        flagged = moderation.is_flagged(
            ctx.session, ctx.upstream, moderation.new_input(body, turn), ctx.moderation_model
        )
    except UpstreamError:
        if not ctx.moderation_fail_open:
            raise
        logger.warning("job %s: moderation unavailable; failing open", job_id)
        return False
    if not flagged:
        return False
    logger.info("job %s: input flagged by moderation; refused", job_id)
    chunk = final_chunk(
        completion_id(job_id),
        "content_filter",
        body.get("model", ""),
        content=moderation.REFUSAL,
    )
    if not ctx.publisher.publish(job_id, attempt, [chunk], moderation.REFUSAL):
        raise JobLost(job_id)
    _complete(ctx, job_id, attempt, turn, moderation.REFUSAL, "content_filter", None, ender)
    return True


def _secrets(ctx: JobContext) -> list[str]:
    """Every upstream key the worker holds: none may reach a viewer."""
    routed = ctx.routes.upstreams.values() if ctx.routes is not None else ()
    return [ctx.upstream.api_key, *(u.api_key for u in routed), *ctx.retired_keys]


def handle_job_failure(
    ctx: JobContext,
    job_id: str,
    attempt: int,
    error: UpstreamError,
    model: str,
    ender: Ender,
) -> None:
    """End a failed job for every viewer.

    1. Write an error chunk in OpenAI's shape, then ``[DONE]``, and mark the job ``failed`` —
       all in one script, which does nothing if the job already ended or is no longer ours, so
       a failure can never add a second ``[DONE]``.
    2. Log it with the job id.
    """
    metrics.upstream_error(ender.tally, error.code)
    with contextlib.suppress(Exception):  # the text so far goes before the error, if it can
        ctx.publisher.flush(job_id, attempt)
    # Viewers see this: never the relay's own upstream key, should the upstream echo it.
    message = sanitize(error.message, *_secrets(ctx))
    ended = ctx.store.fail(job_id, attempt, message, type=error.type, code=error.code,
                           model=model, ender=ender)  # fmt: skip
    logger.warning(
        "job %s failed (%s): %s%s",
        job_id,
        error.code,
        message,
        "" if ended else " [already ended]",
    )


def run_job(
    ctx: JobContext, job_id: str, entry: queue.Entry | None = None, early: Early | None = None
) -> None:
    """Run a claimed job (taken off the queue as ``entry``; ``early``: its request and claim
    sent by the claim loop) to its end, then acknowledge it.

    If the greenlet is killed (shutdown past its grace) the claim is kept on purpose: the
    stopping worker then re-queues or fails the job itself (``Worker._release_claims``), or,
    if it dies first, a janitor does once its heartbeat is gone.
    """
    tally = metrics.Tally()  # the job's counters: written after its first chunk and at its end
    try:
        _run(ctx, job_id, tally, entry, early)
    except Exception as exc:
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            logger.warning("job %s: lost Redis mid-run (%s); left for the janitor", job_id, exc)
        else:
            logger.exception("job %s: could not be run; left for the janitor", job_id)
        with contextlib.suppress(RedisError):
            tally.flush(ctx.store.redis)
        return
    # The acknowledgement and the job's last counters in one round trip (on a cluster, a
    # pipeline sends each to its own node).
    pipe = ctx.store.redis.pipeline(transaction=False)
    queue.acknowledge(pipe, ctx.worker_id, entry.raw if entry is not None else job_id)
    tally.write(pipe)
    try:
        pipe.execute()
    except Exception:
        logger.exception("job %s: could not acknowledge", job_id)


def _run(
    ctx: JobContext, job_id: str, tally: metrics.Tally, entry: queue.Entry | None,
    early: Early | None,
) -> None:  # fmt: skip
    try:
        claim, head_start = _claim(ctx, job_id, entry, early)
    except JobCancelled:  # its order came as the first upstream request was on its way
        logger.info("job %s cancelled; upstream connection closed", job_id)
        return
    attempt, body, turn, created_at, limited_as = claim
    ender = Ender(limited_as, tally)
    if not attempt:
        logger.info("job %s is no longer queued; skipping", job_id)
        return
    _default_model(ctx, body)
    try:
        if ctx.moderation and _refused_by_moderation(ctx, job_id, attempt, body, turn, ender):
            return
        _stream(ctx, job_id, attempt, body, turn, created_at, ender, head_start)
        logger.info("job %s completed", job_id)
    except UpstreamError as exc:
        handle_job_failure(ctx, job_id, attempt, exc, body.get("model", ""), ender)
    except JobLost:
        logger.info("job %s ended elsewhere; stopped relaying", job_id)
    except JobCancelled:
        # The cancel already wrote the final chunk; leaving _stream closed the upstream.
        logger.info("job %s cancelled; upstream connection closed", job_id)
    except (RedisConnectionError, RedisTimeoutError):
        # Its node went away mid-stream (a failover): what was sent may or may not be in the
        # log, so this run cannot go on without risking a hole or a repeat. The claim stays;
        # the orphan sweep ends the job with worker_lost once its slot is served again.
        raise
    except Exception:
        logger.exception("job %s: internal error", job_id)
        error = UpstreamError(
            "The relay worker had an internal error.", type="server_error", code="internal_error"
        )
        handle_job_failure(ctx, job_id, attempt, error, body.get("model", ""), ender)
    finally:
        if head_start is not None:
            head_start.close()  # unread if the job ended before its stream was followed
        with contextlib.suppress(Exception):  # the publisher forgets the job
            ctx.publisher.flush(job_id, attempt)
