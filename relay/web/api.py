"""The job API: jobs in (``POST /v1/jobs``, ``POST /v1/chat/completions``), their status,
event streams and cancel, and the relay's ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import hmac
import logging
import re

from flask import Blueprint, Response, g, jsonify, request, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.core import logs, metrics
from relay.core.chunks import DONE
from relay.core.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from relay.core.jobs import is_job_id
from relay.web import access, guessing
from relay.web.access import Access
from relay.web.aggregate import aggregate
from relay.web.auth import require_api_key
from relay.web.cancelling import cancel_and_keep_reply
from relay.web.sse import format_event
from relay.web.state import settings, state
from relay.web.streaming import follow
from relay.web.streams import STREAM_HEADERS, attach, event_stream, open_stream
from relay.web.submission import Submission, json_body, submit_job

logger = logging.getLogger(__name__)
api = Blueprint("relay", __name__)


@api.before_request
def _authenticate() -> None:
    if request.method == "POST":  # creating and cancelling jobs; reading needs a job's token
        require_api_key()


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


def _external_base() -> str:
    """Where the URLs the relay hands out start: ``RELAY_PUBLIC_URL`` when set, else the
    request's own host (one of the allowed hosts: relay.web.origins)."""
    return settings().public_url.rstrip("/") or request.host_url.rstrip("/")


_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_JOB_SLOT, _TOKEN_SLOT = "~j~", "~t~"  # url_for keeps "~"; no id or token holds one
_LINKS = {"events_url": "relay.job_events", "status_url": "relay.job_status",
          "watch_url": "pages.watch", "cancel_url": "relay.cancel_job"}  # fmt: skip
# Templates kept per process: one set per way of reaching the relay (scheme, host, mount point;
# the host is one of the allowed ones unless any is). Past this many, url_for.
URL_TEMPLATES_MAX = 64


def _templates() -> dict[str, str] | None:
    """Each job URL as a template, base included, for this request's way of reaching the relay
    (made once: ``url_for`` and the request's host URL take 0.1 ms for a job's four links);
    None past :data:`URL_TEMPLATES_MAX` of them."""
    environ = request.environ
    key = (environ.get("wsgi.url_scheme"), environ.get("HTTP_HOST"),
           environ.get("SERVER_NAME"), environ.get("SERVER_PORT"), request.script_root)  # fmt: skip
    cache = state().url_templates
    templates = cache.get(key)
    if templates is None:
        if len(cache) >= URL_TEMPLATES_MAX:
            return None
        base = _external_base()
        templates = cache[key] = {
            name: base + url_for(endpoint, job_id=_JOB_SLOT, token=_TOKEN_SLOT)
            for name, endpoint in _LINKS.items()
        }
    return templates


def job_links(job_id: str, grant: Access, *, creator: bool = False) -> dict[str, str]:
    """The job's URLs, carrying its read token; the cancel URL only for its creator."""
    read, cancel = grant.read_token, grant.cancel_token
    templates = _templates()
    if templates is not None and all(
        _URL_SAFE.fullmatch(part) for part in (job_id, read, cancel if creator else read)
    ):

        def link(name: str, token: str) -> str:
            return templates[name].replace(_JOB_SLOT, job_id).replace(_TOKEN_SLOT, token)
    else:
        base = _external_base()

        def link(name: str, token: str) -> str:
            return base + url_for(_LINKS[name], job_id=job_id, token=token)

    links = {name: link(name, read) for name in ("events_url", "status_url", "watch_url")}
    if creator:
        links["cancel_url"] = link("cancel_url", cancel)
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
    """The job's access record if the caller may watch it (read token or creating key).

    The same work whether or not the job exists, so that timing tells nothing either: the
    caller's key is looked up whenever one is sent, and a missing job's token is compared
    with one that nobody holds.
    """
    logs.bind_job(job_id)
    guessing.check()
    redis = state().redis
    grant = access.load(redis, job_id) if is_job_id(job_id) else None
    authorization = request.headers.get("Authorization")
    caller = access.caller_key_id(redis, authorization) if authorization else None
    allowed = (grant or access.NOBODY).may_watch(request.args.get("token"), caller)
    if grant is None or not allowed:
        guessing.failed()
        raise _unknown(job_id)
    return grant


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
    written, ended, _ = state().store.progress(job_id)
    if after >= written and ended:
        # Nothing will follow: say so at once (a viewer resuming after the end used to get
        # keep-alives until the job expired).
        return Response(format_event(DONE, id=written), mimetype="text/event-stream",
                        headers=STREAM_HEADERS)  # fmt: skip
    if after > written:
        raise InvalidRequest(
            f"Last-Event-ID {after} is after the job's last event ({written}).",
            param="Last-Event-ID",
            code="invalid_value",
        )
    return event_stream(job_id, after)


@api.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Stop generation; viewers get a final chunk (``finish_reason: "cancelled"``) and [DONE].

    Allowed with the job's cancel token (``?token=``) or the key that created it.
    """
    logs.bind_job(job_id)
    guessing.check()
    store = state().store
    grant = access.load(store.redis, job_id) if is_job_id(job_id) else None
    key = g.get("api_key")
    allowed = (grant or access.NOBODY).may_cancel(request.args.get("token"), key and key["id"])
    if grant is None or not allowed:
        guessing.failed()
        raise _unknown(job_id)
    ended = cancel_and_keep_reply(job_id)  # a job that already ended keeps its outcome
    status = store.status(job_id)
    if status is None:
        raise _unknown(job_id)
    if not ended:
        raise Conflict(
            f"Job {job_id} has already ended (status: {status['status']}); "
            "there is nothing to cancel.",
            code="job_already_ended",
        )
    return jsonify({**status, **job_links(job_id, grant, creator=True)})


@api.get("/v1/models")
def list_models():
    """The models the relay serves (OpenAI's shape); a key is needed when keys exist.

    ``X-Relay-Default-Model`` names the model a request without one gets (absent when such a
    request is refused): a picker's "Default" can say what it is, and the body stays OpenAI's.
    """
    require_api_key()
    response = jsonify({"object": "list", "data": state().models.listing()})
    routes = state().routes
    if routes.targets(implied := routes.implied_model()):
        response.headers["X-Relay-Default-Model"] = implied
    return response


@api.get("/v1/models/<path:model_id>")
def get_model(model_id: str):
    require_api_key()
    found = state().models.find(model_id)
    if found is None:
        raise NotFound(
            f"The model '{model_id}' does not exist or the relay does not serve it.",
            param="model",
            code="model_not_found",
        )
    return jsonify(found)


@api.post("/v1/chat/completions")
def chat_completions():
    submission = submit_job(watch=lambda job_id, req: open_stream(job_id)
                            if req.get("stream") is True else None)  # fmt: skip
    headers = link_headers(submission)
    if submission.opened is not None:
        return event_stream(submission.job_id, 0, headers, owner=True, opened=submission.opened)
    return _completion(submission.job_id, headers)


def _completion(job_id: str, headers: dict[str, str]) -> Response:
    """``stream: false``: wait for the job's events and answer one ``chat.completion``."""
    relay = state()
    viewer = attach(job_id, closable=False)  # one answer: it cannot be resumed elsewhere
    idle = settings().keepalive_seconds
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
    required = settings().metrics_key
    given = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if required and not hmac.compare_digest(given.encode(), required.encode()):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <RELAY_METRICS_KEY>'.")
    body = generate_latest(metrics.registry(state().redis))
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


@api.get("/healthz")
def healthz():
    relay = state()
    relay.redis.ping()
    return jsonify({"ok": True, "redis": "ok", "viewers": relay.viewer_count})
