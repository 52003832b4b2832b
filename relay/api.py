"""HTTP endpoints: jobs in, event streams out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, jsonify, request, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from . import logs, metrics
from .aggregate import aggregate
from .app import state
from .auth import require_api_key
from .conversations import Turn
from .errors import InvalidRequest, NotFound, RequestTooLarge, Unavailable
from .fanout import LiveEvent, SubscribeTimeout, Viewer
from .streaming import follow, sse_bytes
from .validation import Limits, validate_chat_request

logger = logging.getLogger(__name__)
api = Blueprint("relay", __name__)


@api.before_request
def _authenticate() -> None:
    if request.method == "POST":  # creating and cancelling jobs; reading is by job id
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


def submit_job(body: Any = None) -> tuple[str, dict[str, Any], Turn]:
    """Validate the body, rebuild its conversation, then store and queue the job."""
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
    request, turn = relay.conversations.prepare(body)
    job_id = relay.store.create(request, turn)
    logs.bind_job(job_id)
    logger.info("job %s queued (model %s)", job_id, request.get("model"))
    return job_id, request, turn


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


def _attach(job_id: str) -> Viewer:
    try:
        return state().hub.attach(job_id)
    except SubscribeTimeout:
        raise Unavailable("The relay could not subscribe to the job; try again.") from None


Render = Callable[[Iterator[LiveEvent | None]], Iterator[bytes]]


def stream_response(
    job_id: str,
    after: int,
    render: Render,
    *,
    mimetype: str,
    headers: dict[str, str] | None = None,
    owner: bool = False,
) -> Response:
    """A streamed response following one job, rendered by ``render``.

    Attaching happens in the view, so a failure is still a proper JSON error. ``owner`` marks
    the stream that created its job: closed before the end while nobody else watches, it
    cancels the job (``CANCEL_ON_DISCONNECT``).
    """
    relay = state()
    viewer = _attach(job_id)
    relay.store.add_viewer(job_id, 1)
    # Read configuration here: the generator runs after the request context is gone.
    idle = float(current_app.config["KEEPALIVE_SECONDS"])
    cancel_if_abandoned = owner and bool(current_app.config["CANCEL_ON_DISCONNECT"])
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    finished = False

    def body() -> Iterator[bytes]:
        nonlocal finished
        yield from render(follow(relay.store, relay.hub, viewer, after, idle=idle))
        finished = True

    def on_close() -> None:
        # An unstarted generator's finally never runs, so detach here as well (idempotent).
        relay.hub.detach(viewer)
        try:
            remaining = relay.store.add_viewer(job_id, -1)
            if cancel_if_abandoned and not finished and remaining <= 0:
                logger.info("job %s: its only viewer left; cancelling", job_id)
                with app.app_context():
                    _cancel(job_id)
        except RedisError as exc:
            logger.warning("job %s: could not update viewers on close: %s", job_id, exc)

    response = Response(body(), mimetype=mimetype, headers={**STREAM_HEADERS, **(headers or {})})
    response.call_on_close(on_close)
    return response


def _event_stream(
    job_id: str, after: int, headers: dict[str, str] | None = None, *, owner: bool = False
) -> Response:
    """The job as ``text/event-stream``."""
    retry_ms = int(current_app.config["RETRY_MS"])
    return stream_response(
        job_id,
        after,
        lambda events: sse_bytes(events, retry_ms=retry_ms),
        mimetype="text/event-stream",
        headers=headers,
        owner=owner,
    )


def job_links(job_id: str) -> dict[str, str]:
    return {
        "events_url": url_for("relay.job_events", job_id=job_id, _external=True),
        "status_url": url_for("relay.job_status", job_id=job_id, _external=True),
    }


@api.post("/v1/jobs")
def create_job():
    body = json_body()
    if isinstance(body, dict):
        body["stream"] = True  # a job is always streamed to its viewers
    job_id, _, turn = submit_job(body)
    links = job_links(job_id)
    body = {
        "id": job_id,
        "object": "relay.job",
        "status": "queued",
        "messageId": turn.message_id,
        "parentMessageId": turn.parent_message_id,
        **links,
    }
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = links["status_url"]
    return response


@api.get("/v1/jobs/<job_id>")
def job_status(job_id: str):
    logs.bind_job(job_id)
    status = state().store.status(job_id)
    if status is None:
        raise NotFound(f"No job with id '{job_id}' (it may have expired).", param="id")
    return jsonify({**status, **job_links(job_id)})


@api.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    logs.bind_job(job_id)
    after = _last_event_id()
    if not state().store.exists(job_id):
        raise NotFound(f"No job with id '{job_id}' (it may have expired).", param="id")
    return _event_stream(job_id, after)


@api.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Stop generation; viewers get a final chunk (``finish_reason: "cancelled"``) and [DONE]."""
    logs.bind_job(job_id)
    store = state().store
    if not store.exists(job_id):
        raise NotFound(f"No job with id '{job_id}' (it may have expired).", param="id")
    _cancel(job_id)  # a job that already ended keeps its outcome
    return jsonify({**store.status(job_id), **job_links(job_id)})  # type: ignore[dict-item]


@api.post("/v1/chat/completions")
def chat_completions():
    job_id, body, turn = submit_job()
    links = job_links(job_id)
    headers = {
        "X-Relay-Job-Id": job_id,
        "X-Relay-Events-Url": links["events_url"],
        "X-Relay-Message-Id": turn.message_id,
    }
    if body.get("stream"):
        return _event_stream(job_id, 0, headers, owner=True)
    return _completion(job_id, headers)


def _completion(job_id: str, headers: dict[str, str]) -> Response:
    """``stream: false``: wait for the job's events and answer one ``chat.completion``."""
    relay = state()
    viewer = _attach(job_id)
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
