"""HTTP endpoints: jobs in, event streams out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson
from flask import Blueprint, Response, current_app, g, jsonify, request, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from . import access, logs, metrics
from .access import Access
from .aggregate import aggregate
from .app import state
from .auth import require_api_key
from .conversations import Turn
from .errors import InvalidRequest, NotFound, RateLimited, RequestTooLarge, Unavailable
from .fanout import LiveEvent, SubscribeTimeout, Viewer
from .jobs import is_job_id, new_job_id
from .limits import Throttle
from .streaming import follow, retry_field, sse_bytes
from .validation import Limits, validate_chat_request

logger = logging.getLogger(__name__)
api = Blueprint("relay", __name__)


@api.before_request
def _authenticate() -> None:
    if request.method == "POST":  # creating and cancelling jobs; reading needs a job's token
        require_api_key()


STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to, which kills the typewriter effect.
    "X-Accel-Buffering": "no",
}


def _body_bytes() -> bytes:
    """The request body, refusing one over the limit also when it comes chunked.

    Werkzeug checks a declared Content-Length, but silently truncates a chunked body at the
    limit, which would surface as a misleading "invalid JSON".
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None or not request.environ.get("wsgi.input_terminated"):
        return request.get_data(cache=False)
    data = request.environ["wsgi.input"].read(limit + 1)
    if len(data) > limit:
        raise RequestTooLarge()
    return data


def json_body() -> Any:
    try:
        return orjson.loads(_body_bytes())
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        ) from None


class Submission(NamedTuple):
    job_id: str
    request: dict[str, Any]
    turn: Turn
    access: Access


def _caller() -> tuple[str, int, int]:
    """Who is asking, for the limits: (caller, requests per minute, concurrent jobs)."""
    config = current_app.config
    rpm, concurrency = int(config["RATE_LIMIT_RPM"]), int(config["CONCURRENCY_LIMIT"])
    key = g.get("api_key")
    if key is None:  # the relay runs open: each client address is a caller
        return f"addr:{request.remote_addr}", rpm, concurrency
    own_rpm, own_concurrency = int(key.get("rpm") or 0), int(key.get("concurrency") or 0)
    return f"key:{key['id']}", own_rpm or rpm, own_concurrency or concurrency


def _admit(throttle: Throttle, caller: str, rpm: int) -> None:
    """Refuse the request if its caller is over its rate or the queue is full."""
    wait = throttle.hit(caller, rpm)
    if wait:
        raise RateLimited(
            f"Rate limit reached: {rpm} requests per minute. Please try again in {wait}s.",
            retry_after=wait,
        )
    if throttle.queue_full(int(current_app.config["MAX_QUEUED_JOBS"])):
        raise Unavailable(
            "The relay's queue is full; please try again shortly.",
            code="queue_full",
            headers={"Retry-After": str(current_app.config["QUEUE_FULL_RETRY_AFTER"])},
        )


def submit_job(body: Any = None) -> Submission:
    """Check limits, validate the body, rebuild its conversation, then store and queue the job.

    Nothing is written before every limit has been checked: a refused request leaves no trace
    but its count against the rate limit.
    """
    throttle = state().throttle
    caller, rpm, concurrency = _caller()
    _admit(throttle, caller, rpm)
    if body is None:
        body = json_body()
    config = current_app.config
    limits = Limits(
        max_messages=int(config["MAX_MESSAGES"]),
        max_input_chars=int(config["MAX_INPUT_CHARS"]),
        max_tokens=int(config["MAX_TOKENS"]),
    )
    body = validate_chat_request(body, default_model=config["DEFAULT_MODEL"], limits=limits)
    relay = state()
    owner = g.api_key["id"] if g.get("api_key") else ""
    draft = relay.conversations.prepare(body, owner)
    job_id = new_job_id()
    max_age = int(config["JOB_MAX_AGE_SECONDS"])
    if not throttle.acquire(caller, job_id, concurrency, max_age):
        raise RateLimited(
            f"Too many jobs at once: at most {concurrency} may be queued or running. Please "
            "try again when one has finished.",
            retry_after=1,
            code="concurrency_limit_exceeded",
        )
    grant = Access.new(owner=owner)
    try:
        turn = relay.conversations.save(draft)
        limited_as = caller if concurrency > 0 else ""
        relay.store.create(draft.request, turn, access=grant, job_id=job_id, limited_as=limited_as)
    except BaseException:
        throttle.release(caller, job_id)
        raise
    logs.bind_job(job_id)
    logger.info("job %s queued (model %s)", job_id, draft.request.get("model"))
    return Submission(job_id, draft.request, turn, grant)


def _cancel(job_id: str) -> None:
    """Cancel a job and keep its text so far as a reply that can be a parent."""
    relay = state()
    ended, _ = relay.store.cancel(job_id)
    turn = relay.store.turn(job_id)
    if ended and turn is not None:
        status = relay.store.status(job_id) or {}
        relay.conversations.save_reply(turn, status.get("text") or "")


def _last_event_id() -> int:
    """The position to resume after: the ``Last-Event-ID`` header, else ``?lastEventId=``."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²".isdigit() is True
        raise InvalidRequest(
            "Last-Event-ID must be a non-negative integer event id.",
            param="Last-Event-ID",
            code="invalid_value",
        )
    return int(raw)


def _attach(job_id: str, *, closable: bool = True) -> Viewer:
    try:
        return state().hub.attach(job_id, closable=closable)
    except SubscribeTimeout:
        raise Unavailable("The relay could not subscribe to the job; try again.") from None


Render = Callable[[Iterator[LiveEvent | None], Viewer], Iterator[bytes]]


def stream_response(
    job_id: str,
    after: int,
    render: Render,
    *,
    mimetype: str,
    headers: dict[str, str] | None = None,
    owner: bool = False,
    direct: bytes | None = None,
) -> Response:
    """A streamed response following one job, rendered by ``render``.

    Attaching happens in the view, so a failure is still a proper JSON error. ``owner`` marks
    the stream that created its job: closed before the end while nobody else watches, it
    cancels the job (``CANCEL_ON_DISCONNECT``). Given ``direct`` (the bytes to write before
    the first event), the dispatcher may write live events to the client itself (only for
    :func:`sse_bytes`, see :func:`follow`).
    """
    relay = state()
    viewer = _attach(job_id)
    if direct is not None and current_app.config["DIRECT_WRITES"]:
        _allow_direct(viewer, direct)
    relay.store.add_viewer(job_id, 1)
    restore_timeout = _cut_off_stalled_client(float(current_app.config["SEND_TIMEOUT_SECONDS"]))
    # Read configuration here: the generator runs after the request context is gone.
    idle = float(current_app.config["KEEPALIVE_SECONDS"])
    cancel_if_abandoned = owner and bool(current_app.config["CANCEL_ON_DISCONNECT"])
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    finished = False

    def body() -> Iterator[bytes]:
        nonlocal finished
        yield from render(follow(relay.store, relay.hub, viewer, after, idle=idle), viewer)
        finished = True

    def on_close() -> None:
        # An unstarted generator's finally never runs, so detach here as well (idempotent).
        relay.hub.detach(viewer)
        restore_timeout()
        try:
            remaining = relay.store.add_viewer(job_id, -1)
            # A stream ended by shutdown was not abandoned: its client resumes elsewhere.
            abandoned = not finished and not viewer.closed
            if cancel_if_abandoned and abandoned and remaining <= 0:
                logger.info("job %s: its only viewer left; cancelling", job_id)
                with app.app_context():
                    _cancel(job_id)
        except RedisError as exc:
            logger.warning("job %s: could not update viewers on close: %s", job_id, exc)

    response = Response(body(), mimetype=mimetype, headers={**STREAM_HEADERS, **(headers or {})})
    response.call_on_close(on_close)
    return response


def _allow_direct(viewer: Viewer, prefix: bytes) -> None:
    """The fast path needs the client's socket and how the server frames the body: known for
    gunicorn's gevent worker (HTTP/1.1 chunked, one chunk per write; HTTP/1.0 raw)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None or request.method == "HEAD":  # HEAD: gunicorn writes no body at all
        return
    protocol = request.environ.get("SERVER_PROTOCOL")
    # Plain HTTP/1.x on a plain socket only: under TLS (gunicorn --certfile) the raw socket
    # beneath would get plaintext, and HTTP/2 multiplexes streams on one socket.
    if protocol not in ("HTTP/1.0", "HTTP/1.1") or hasattr(sock, "cipher"):
        return
    viewer.allow_direct(sock, protocol == "HTTP/1.1", prefix)


def _cut_off_stalled_client(seconds: float) -> Callable[[], None]:
    """Give up on a client that takes no bytes for ``seconds`` (it stopped reading).

    Such a viewer costs only its bounded mailbox (it falls back to the replay log), but its
    connection and greenlet would stay for ever; cut off, it can resume with Last-Event-ID.
    Writes to the client block on this socket, so its timeout bounds each one (gunicorn's
    gevent workers expose the socket; other servers keep their own behaviour). Returns what
    puts the socket's own timeout back once the stream is over.
    """
    # "gunicorn.socket" under -k gevent; "gunicorn.sock" under -k gevent_pywsgi.
    sock = request.environ.get("gunicorn.socket") or request.environ.get("gunicorn.sock")
    if sock is None or seconds <= 0:
        return lambda: None
    previous = sock.gettimeout()
    sock.settimeout(seconds)

    def restore() -> None:  # a kept-alive connection then waits as gunicorn means it to
        try:
            sock.settimeout(previous)
        except OSError:
            pass  # already closed

    return restore


def _event_stream(
    job_id: str, after: int, headers: dict[str, str] | None = None, *, owner: bool = False
) -> Response:
    """The job as ``text/event-stream``."""
    retry_ms = int(current_app.config["RETRY_MS"])
    return stream_response(
        job_id,
        after,
        lambda events, viewer: sse_bytes(events, retry_ms=retry_ms, viewer=viewer),
        mimetype="text/event-stream",
        headers=headers,
        owner=owner,
        direct=retry_field(retry_ms),
    )


def job_links(job_id: str, grant: Access, *, creator: bool = False) -> dict[str, str]:
    """The job's URLs, carrying its read token; the cancel URL only for its creator."""
    links = {
        "events_url": url_for(
            "relay.job_events", job_id=job_id, token=grant.read_token, _external=True
        ),
        "status_url": url_for(
            "relay.job_status", job_id=job_id, token=grant.read_token, _external=True
        ),
        "watch_url": url_for("pages.watch", job_id=job_id, token=grant.read_token, _external=True),
    }
    if creator:
        links["cancel_url"] = url_for(
            "relay.cancel_job", job_id=job_id, token=grant.cancel_token, _external=True
        )
    return links


def link_headers(submission: Submission) -> dict[str, str]:
    """Response headers that tell a streaming creator its job and where else to follow it."""
    links = job_links(submission.job_id, submission.access, creator=True)
    return {
        "X-Relay-Job-Id": submission.job_id,
        "X-Relay-Message-Id": submission.turn.message_id,
        "X-Relay-Events-Url": links["events_url"],
        "X-Relay-Watch-Url": links["watch_url"],
        "X-Relay-Cancel-Url": links["cancel_url"],
    }


def _unknown(job_id: str) -> NotFound:
    # The same answer for a job that does not exist and one the caller may not see.
    return NotFound(f"No job with id '{job_id}' (it may have expired).", param="id")


def _granted(job_id: str) -> Access:
    """The job's access record if the caller may watch it (read token or creating key)."""
    logs.bind_job(job_id)
    redis = state().redis
    grant = access.load(redis, job_id) if is_job_id(job_id) else None
    if grant is None:
        raise _unknown(job_id)
    if grant.may_watch(request.args.get("token"), None):
        return grant
    # Only now look the caller's key up: most viewers come with the token alone.
    if grant.owner and grant.is_owner(
        access.caller_key_id(redis, request.headers.get("Authorization"))
    ):
        return grant
    raise _unknown(job_id)


@api.post("/v1/jobs")
def create_job():
    body = json_body()
    if isinstance(body, dict):
        body["stream"] = True  # a job is always streamed to its viewers
    submission = submit_job(body)
    job_id, turn = submission.job_id, submission.turn
    links = job_links(job_id, submission.access, creator=True)
    body = {
        "id": job_id,
        "object": "relay.job",
        "status": "queued",
        "messageId": turn.message_id,
        "parentMessageId": turn.parent_message_id,
        "read_token": submission.access.read_token,
        "cancel_token": submission.access.cancel_token,
        **links,
    }
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = links["status_url"]
    return response


@api.get("/v1/jobs/<job_id>")
def job_status(job_id: str):
    grant = _granted(job_id)
    status = state().store.status(job_id)
    if status is None:
        raise _unknown(job_id)
    if not _by_creating_key(grant):
        # The conversation's ids let their holder continue it: a read token grants watching.
        status.pop("messageId", None)
        status.pop("parentMessageId", None)
    return jsonify({**status, **job_links(job_id, grant)})


def _by_creating_key(grant: Access) -> bool:
    authorization = request.headers.get("Authorization")
    return bool(grant.owner and authorization) and grant.is_owner(
        access.caller_key_id(state().redis, authorization)
    )


@api.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    after = _last_event_id()
    _granted(job_id)
    return _event_stream(job_id, after)


@api.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Stop generation; viewers get a final chunk (``finish_reason: "cancelled"``) and [DONE].

    Allowed with the job's cancel token (``?token=``) or the key that created it.
    """
    logs.bind_job(job_id)
    store = state().store
    grant = access.load(store.redis, job_id) if is_job_id(job_id) else None
    key = g.get("api_key")
    if grant is None or not grant.may_cancel(request.args.get("token"), key and key["id"]):
        raise _unknown(job_id)
    _cancel(job_id)  # a job that already ended keeps its outcome
    status = store.status(job_id)
    if status is None:
        raise _unknown(job_id)
    return jsonify({**status, **job_links(job_id, grant, creator=True)})


@api.post("/v1/chat/completions")
def chat_completions():
    submission = submit_job()
    headers = link_headers(submission)
    if submission.request.get("stream"):
        return _event_stream(submission.job_id, 0, headers, owner=True)
    return _completion(submission.job_id, headers)


def _completion(job_id: str, headers: dict[str, str]) -> Response:
    """``stream: false``: wait for the job's events and answer one ``chat.completion``."""
    relay = state()
    viewer = _attach(job_id, closable=False)  # one answer: it cannot be resumed elsewhere
    idle = float(current_app.config["KEEPALIVE_SECONDS"])
    events = follow(relay.store, relay.hub, viewer, 0, idle=idle)
    result = aggregate(event.data for event in events if event is not None)
    if result.error is not None:
        response = jsonify({"error": result.error})
        response.status_code = 504 if result.error.get("code") == "upstream_timeout" else 502
    else:
        response = jsonify(result.completion(job_id))
    response.headers.update(headers)
    return response


@api.get("/metrics")
def prometheus_metrics():
    """Prometheus metrics for the whole relay (shared counters in Redis)."""
    body = generate_latest(metrics.registry(state().redis))
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


@api.get("/healthz")
def healthz():
    relay = state()
    relay.redis.ping()
    return jsonify({"ok": True, "redis": "ok", "viewers": relay.viewer_count})
