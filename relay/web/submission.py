"""Taking a request in: the body, the caller's limits, its conversation, then the job stored
and queued."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from flask import g, request
from redis.exceptions import RedisError

from relay.core import logs
from relay.core.conversations import Turn
from relay.core.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    RelayError,
    RequestTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from relay.core.jobs import QueueFull, new_job_id
from relay.web import guessing
from relay.web.access import Access
from relay.web.limits import Throttle
from relay.web.state import settings, state
from relay.web.validation import Limits, validate_chat_request

if TYPE_CHECKING:
    from relay.web.streams import Opened

logger = logging.getLogger(__name__)

# Given the new job's id and its request (a JSON object, not yet checked: a request refused
# later takes the stream back), a creator's stream subscribed before the job is stored
# (relay.web.streams.open_stream), or None for a creator that will not stream.
Watch = Callable[[str, dict[str, Any]], "Opened | None"]


def _body_bytes() -> bytes:
    """The request body, refusing one over the limit also when it comes chunked.

    Werkzeug checks a declared Content-Length, but silently truncates a chunked body at the
    limit, which would surface as a misleading "invalid JSON".
    """
    limit, length, environ = settings().max_body_bytes, request.content_length, request.environ
    if length is not None:
        if length > limit:
            raise RequestTooLarge()
        # Read as werkzeug would, without its stream wrappers (0.02 ms a request).
        return environ["wsgi.input"].read(length) if length else b""
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and not chunked: no body (as werkzeug has it)
    data = environ["wsgi.input"].read(limit + 1)
    if len(data) > limit:
        raise RequestTooLarge()
    return data


def json_body() -> Any:
    """The request body parsed as JSON, or a 400 ``invalid_json``.

    It must say it is JSON (415 otherwise): a body sent as ``text/plain`` is one that any web
    page may send cross-site without asking first (no CORS preflight).
    """
    if not request.is_json:
        raise UnsupportedMediaType(
            "Send the body as JSON, with 'Content-Type: application/json'.",
            param="Content-Type",
        )
    try:
        return orjson.loads(_body_bytes())
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        ) from None


class Submission(NamedTuple):
    """A job just created: what the endpoint answers its creator with."""

    job_id: str
    request: dict[str, Any]
    turn: Turn
    access: Access
    opened: Opened | None = None  # the creator's stream, when ``watch`` opened one


def _caller() -> tuple[str, int, int]:
    """Who is asking, for the limits: (caller, requests per minute, concurrent jobs)."""
    config = settings()
    rpm, concurrency = config.rate_limit_rpm, config.concurrency_limit
    key = g.get("api_key")
    if key is None:  # the relay runs open: each client address is a caller
        return f"addr:{request.remote_addr}", rpm, concurrency
    own_rpm, own_concurrency = int(key.get("rpm") or 0), int(key.get("concurrency") or 0)
    return f"key:{key['id']}", own_rpm or rpm, own_concurrency or concurrency


def _admit(throttle: Throttle, caller: str, rpm: int) -> str:
    """Count the request against its caller's rate, or refuse it; the count's id."""
    wait, counted = throttle.hit(caller, rpm)
    if wait:
        raise RateLimited(
            f"Rate limit reached: {rpm} requests per minute. Please try again in {wait}s.",
            retry_after=wait,
        )
    return counted


def _queue_full() -> Unavailable:
    return Unavailable(
        "The relay's queue is full; please try again shortly.",
        code="queue_full",
        headers={"Retry-After": str(settings().queue_full_retry_after)},
    )


def submit_job(body: Any = None, watch: Watch | None = None) -> Submission:
    """Check limits, validate the body, rebuild its conversation, then store and queue the job.
    ``watch`` opens the creator's stream once the job's id is known, before it is stored.

    The rate is counted first, so that a caller over it is refused before any work; a request
    refused after that (a 4xx: a bad body, an unknown parent, the concurrency limit, a full
    queue's 503 too) gets its count back. A refused request leaves no trace: the queue's cap is
    checked by the push that queues the job (one round trip with the turn's writes), and a
    full queue takes the job and the turn back.
    """
    throttle = state().throttle
    caller, rpm, concurrency = _caller()
    counted = _admit(throttle, caller, rpm)
    try:
        return _submit(throttle, caller, concurrency, body, watch)
    except RelayError as refused:
        if 400 <= refused.status < 500 or refused.code == "queue_full":
            with contextlib.suppress(RedisError):  # the refusal is the answer either way
                throttle.refund(caller, counted)
        raise


def _submit(
    throttle: Throttle, caller: str, concurrency: int, body: Any, watch: Watch | None
) -> Submission:
    if body is None:
        body = json_body()
    job_id = new_job_id()
    # The creator's subscription starts now: its round trip runs while the request is checked
    # and its conversation rebuilt, and the job's store says whether it took effect first
    # (relay.web.streams.Opened). A request refused meanwhile takes it back.
    opened = watch(job_id, body) if watch is not None and isinstance(body, dict) else None
    try:
        return _store(throttle, caller, concurrency, body, job_id, opened)
    except BaseException:
        if opened is not None:
            opened.abandon()
        raise


def _store(throttle: Throttle, caller: str, concurrency: int, body: Any, job_id: str,
           opened: Opened | None) -> Submission:  # fmt: skip
    relay = state()
    config = relay.settings
    limits = Limits(
        max_messages=config.max_messages,
        max_input_chars=config.max_input_chars,
        max_tokens=config.max_tokens,
    )
    body = validate_chat_request(body, default_model=relay.routes.implied_model(), limits=limits)
    model = body.get("model") or ""
    if not relay.routes.targets(model):
        raise NotFound(
            f"The model '{model}' does not exist or the relay does not serve it "
            "(GET /v1/models lists those it does).",
            param="model",
            code="model_not_found",
        )
    owner = g.api_key["id"] if g.get("api_key") else ""
    if "parentMessageId" in body:
        guessing.check()
    try:
        draft = relay.conversations.prepare(body, owner)
    except NotFound:
        guessing.failed()  # a message id is a secret: an unknown one may be a guess
        raise
    if not throttle.acquire(caller, job_id, concurrency, config.job_max_age_seconds):
        raise RateLimited(
            f"Too many jobs at once: at most {concurrency} may be queued or running. Please "
            "try again when one has finished.",
            retry_after=1,
            code="concurrency_limit_exceeded",
        )
    grant = Access.new(owner=owner)
    try:
        # The turn's writes and the job's go in one round trip where they can.
        pipe = relay.redis.pipeline(transaction=False)
        turn = relay.conversations.save(draft, pipe)
        try:
            relay.store.create(draft.request, turn, grant=grant.fields(), job_id=job_id,
                               limited_as=caller if concurrency > 0 else "",
                               max_queued=config.max_queued_jobs, viewers=int(bool(opened)),
                               pipe=pipe, subscribed=opened.stored if opened else None)  # fmt: skip
        except QueueFull:
            with contextlib.suppress(RedisError):  # the ids were never handed out
                relay.conversations.forget(draft, turn)
            raise _queue_full() from None
    except BaseException:
        throttle.release(caller, job_id)
        raise
    logs.bind_job(job_id)
    logger.info("job %s queued (model %s)", job_id, draft.request.get("model"))
    return Submission(job_id, draft.request, turn, grant, opened)
