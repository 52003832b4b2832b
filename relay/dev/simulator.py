"""An OpenAI-compatible upstream simulator over real HTTP, for tests, benchmarks and the dev stack.

Run it with ``python -m relay.dev.simulator --host 127.0.0.1 --port 8081 [--interval 0.02]
[--api-key KEY] [--tokens N] [--reply TEXT]`` (``RELAY_SIM_INTERVAL`` and ``RELAY_SIM_TOKENS``
set the default interval and number of words; ``--reply`` makes every reply that exact text
unless a request asks otherwise — for browser tests, whose page sends no simulator options).
It serves ``POST /v1/chat/completions`` (streamed or not), ``POST /v1/moderations`` (flags text that
contains "forbidden"; answers 503 to text that contains "moderation-outage"),
``GET /v1/models`` (``--models a,b``), ``GET /healthz``, and for
tests ``GET|DELETE /_sim/requests`` (recorded bodies, last 1000) and ``GET /_sim/stats``.

The reply is deterministic: :func:`reply_text` gives the exact text for a request body.
A request steers the simulator with an optional ``"simulator": {...}`` body field (an
``X-Sim-Fail: <fail mode>`` header forces a failure before the first chunk, whatever the body
says: for an upstream whose routes-file headers set it):

- ``reply`` (str): this exact text; pieces keep whitespace attached to the following word.
- ``reasoning`` (str): streamed first as ``reasoning_content`` deltas (as llama.cpp, vLLM and
  DeepSeek send a reasoning model's thinking), in pieces like ``reply``'s.
- ``tokens`` (int, default 12): number of generated words when there is no ``reply``.
- ``interval`` (float s): pause before each content chunk (default: the server's interval).
- ``first_delay`` (float s): pause after the headers, before the first chunk.
- ``finish_reason`` (str): overrides the final finish_reason.
- ``timestamps`` (bool): every chunk carries ``"x_sim_emitted_at": time.time()``.
- ``format`` (str or list): ``crlf`` (``\\r\\n`` line endings), ``comments`` (``: ping``
  before each event), ``multiline`` (pretty-printed JSON over several ``data:`` lines).
- ``fail`` (str) with ``fail_after`` (int, chunks sent first, counting the role chunk):
  ``status_500``, ``status_429`` (with ``Retry-After: 1``), ``status_404`` (an unknown
  model, as OpenAI and vLLM answer it), ``status_400`` (a request refused), ``json_error``
  (an error object in a 200 ``application/json`` answer), ``hang`` (silence for up to
  600 s), ``drop_after`` (abort the connection without the chunked terminator),
  ``error_after`` (an SSE error event, then the end of the stream without ``[DONE]``);
  hostile ones: ``odd_chunk`` (valid JSON of an unusable shape, ``"choices": [1]``, then
  ``[DONE]``), ``retry_after_nan`` (429 with ``Retry-After: nan``), ``echo_key`` (a 401 whose
  message repeats the request's ``Authorization`` header, as some servers do).

``max_tokens`` / ``max_completion_tokens`` truncate the pieces (finish_reason ``length``), and
``stream_options.include_usage`` adds OpenAI's usage chunk.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright stars drift "
    "across quiet silver skies and gentle rivers hum old songs to distant hills"
).split()
DEFAULT_TOKENS = 12
MAX_TOKENS = 100_000
MAX_RECORDED = 1000
HANG_SECONDS = 600.0
FAULTS = frozenset(
    {"status_500", "status_429", "status_404", "status_400", "json_error", "hang", "drop_after",
     "error_after", "odd_chunk", "retry_after_nan", "echo_key"}
)  # fmt: skip
FORMATS = frozenset({"crlf", "comments", "multiline"})

StartResponse = Callable[..., Callable[[bytes], Any]]


class SimulatedDrop(Exception):
    """Raised inside a response body to abort the connection mid-response."""


def _error(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@dataclass(frozen=True)
class Plan:
    """Everything one request asks of the simulator, validated."""

    pieces: list[str]
    thoughts: list[str]  # reasoning_content pieces, streamed before the content
    finish_reason: str
    interval: float
    first_delay: float
    fail: str | None
    fail_after: int
    timestamps: bool
    formats: frozenset[str]


def _options(body: dict) -> dict:
    options = body.get("simulator") or {}
    if not isinstance(options, dict):
        raise ValueError("'simulator' must be an object")
    return options


def _number(options: dict, key: str, default: float, integer: bool = False) -> Any:
    value = options.get(key)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    # bool is an int subclass, and True seconds or tokens is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        raise ValueError(
            f"simulator.{key} must be a non-negative {'integer' if integer else 'number'}"
        )
    return value


def _pieces(options: dict, name: str) -> list[str] | None:
    """``options[name]`` cut into word pieces (each with the whitespace before it), or None."""
    text = options.get(name)
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"simulator.{name} must be a string")
    pieces = re.findall(r"\s*\S+", text)
    tail = text[sum(map(len, pieces)) :]
    # Trailing whitespace has no following word: keep it so "".join(pieces) == text.
    if tail:
        pieces = [*pieces[:-1], pieces[-1] + tail] if pieces else [tail]
    return pieces


def _content(body: dict) -> tuple[list[str], str]:
    """The content pieces and the finish_reason a body gets (before ``finish_reason``)."""
    options = _options(body)
    pieces = _pieces(options, "reply")
    if pieces is None:
        tokens = _number(options, "tokens", DEFAULT_TOKENS, integer=True)
        if tokens > MAX_TOKENS:
            raise ValueError(f"simulator.tokens must be at most {MAX_TOKENS}")
        pieces = [WORDS[i % len(WORDS)] for i in range(tokens)]
        pieces = [(" " + w if i else w.capitalize()) for i, w in enumerate(pieces)]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(pieces):
        return pieces[:limit], "length"
    return pieces, "stop"


def reply_pieces(body: dict) -> list[str]:
    """The content deltas, in order, the simulator streams for ``body``."""
    return _content(body)[0]


def reply_text(body: dict) -> str:
    """The exact full assistant text the simulator produces for ``body``."""
    return "".join(reply_pieces(body))


def reply_finish_reason(body: dict) -> str:
    """The finish_reason the simulator ends ``body``'s reply with (absent a ``fail``)."""
    override = _options(body).get("finish_reason")
    return override if isinstance(override, str) else _content(body)[1]


def make_plan(body: dict, default_interval: float) -> Plan:
    """Validate a request body's simulator options; raises ``ValueError`` with a message."""
    options = _options(body)
    pieces, finish = _content(body)
    override = options.get("finish_reason")
    if override is not None and not isinstance(override, str):
        raise ValueError("simulator.finish_reason must be a string")
    fail = options.get("fail")
    if fail is not None and fail not in FAULTS:
        raise ValueError(f"simulator.fail must be one of {sorted(FAULTS)}")
    formats = options.get("format") or []
    formats = [formats] if isinstance(formats, str) else formats
    if not isinstance(formats, list) or not all(f in FORMATS for f in map(str, formats)):
        raise ValueError(f"simulator.format must be among {sorted(FORMATS)}")
    return Plan(
        pieces=pieces,
        thoughts=_pieces(options, "reasoning") or [],
        finish_reason=override or finish,
        interval=float(_number(options, "interval", default_interval)),
        first_delay=float(_number(options, "first_delay", 0.0)),
        fail=fail,
        fail_after=_number(options, "fail_after", 0, integer=True),
        timestamps=options.get("timestamps") is True,
        formats=frozenset(formats),
    )


def _words(value: Any) -> int:
    """A rough token count: words in a message content (a string or a list of text parts)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(part.get("text")) for part in value if isinstance(part, dict))
    return 0


def _usage(body: dict, completion_tokens: int) -> dict:
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    prompt = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def encode_event(payload: dict | str, formats: frozenset[str] = frozenset()) -> bytes:
    """One SSE event: ``data: <json>`` (or ``[DONE]``) in the requested wire format."""
    if isinstance(payload, str):
        lines = [payload]
    elif "multiline" in formats:
        lines = json.dumps(payload, indent=1, ensure_ascii=False).split("\n")
    else:
        lines = [json.dumps(payload, separators=(",", ":"), ensure_ascii=False)]
    nl = "\r\n" if "crlf" in formats else "\n"
    text = "".join(f"data: {line}{nl}" for line in lines) + nl
    return ((f": ping{nl}" if "comments" in formats else "") + text).encode()


def _json(start_response: StartResponse, status: int, obj: Any, *headers: tuple) -> list[bytes]:
    data = json.dumps(obj).encode()
    status_line = f"{status} {HTTPStatus(status).phrase}"
    type_, length = ("Content-Type", "application/json"), ("Content-Length", str(len(data)))
    start_response(status_line, [type_, length, *headers])
    return [data]


def _invalid(
    start_response: StartResponse, status: int, message: str, code: str | None = None
) -> list[bytes]:
    return _json(start_response, status, _error(message, "invalid_request_error", code))


class Simulator:
    """The WSGI application; its state is per process (gevent: one thread, no locks needed)."""

    def __init__(
        self,
        interval: float = 0.02,
        api_key: str | None = None,
        tokens: int = DEFAULT_TOKENS,
        reply: str | None = None,
        models: tuple[str, ...] = ("simulator",),
        reasoning: str | None = None,
        refuse_stream_options: bool = False,
    ) -> None:
        self.models = models
        self.reasoning = reasoning
        # As some servers do (Azure OpenAI's older API versions, some proxies): a 400.
        self.refuse_stream_options = refuse_stream_options
        self.interval = interval
        self.api_key = api_key
        self.tokens = tokens
        self.reply = reply
        self.requests: deque[Any] = deque(maxlen=MAX_RECORDED)
        self.active_streams = 0
        self.peak_streams = 0  # the most streams at once since the stats were last reset
        self.connections = 0  # TCP connections accepted (keep-alive clients reuse theirs)
        self.total_requests = 0
        self.moderations = 0

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path.startswith("/v1/") and not self._authorized(environ):
            return _invalid(start_response, 401, "Incorrect API key provided.", "invalid_api_key")
        match method, path:
            case "POST", "/v1/chat/completions":
                return self._chat(environ, start_response)
            case "POST", "/v1/moderations":
                return self._moderate(environ, start_response)
            case "GET", "/v1/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulator"}
                        for m in self.models]  # fmt: skip
                return _json(start_response, 200, {"object": "list", "data": data})
            case "GET", "/healthz":
                return _json(start_response, 200, {"ok": True})
            case "GET", "/_sim/requests":
                return _json(start_response, 200, list(self.requests))
            case "DELETE", "/_sim/requests":
                self.requests.clear()
                return _json(start_response, 200, {"ok": True})
            case "GET", "/_sim/stats":
                stats = {
                    "active_streams": self.active_streams,
                    "peak_streams": self.peak_streams,
                    "connections": self.connections,
                    "total_requests": self.total_requests,
                    "moderations": self.moderations,
                }
                return _json(start_response, 200, stats)
        return _invalid(start_response, 404, f"No route {method} {path}")

    def _with_defaults(self, body: dict) -> dict:
        """``body`` with the server's default reply or word count, and reasoning, unless it
        names its own."""
        options = defaults = _options(body)
        if self.reasoning is not None and "reasoning" not in options:
            defaults = {**defaults, "reasoning": self.reasoning}
        if "reply" not in options and "tokens" not in options:
            if self.reply is not None:
                defaults = {**defaults, "reply": self.reply}
            elif self.tokens != DEFAULT_TOKENS:
                defaults = {**defaults, "tokens": self.tokens}
        return body if defaults is options else {**body, "simulator": defaults}

    def _authorized(self, environ: dict) -> bool:
        if not self.api_key:
            return True
        given = environ.get("HTTP_AUTHORIZATION", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    def _moderate(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """OpenAI's moderation endpoint: text containing ``forbidden`` is flagged (category
        ``harassment``); text containing ``moderation-outage`` gets a 503."""
        self.moderations += 1
        try:
            body = json.loads(_read_body(environ) or b"null")
        except ValueError as exc:
            return _invalid(start_response, 400, f"Invalid JSON body: {exc}")
        inputs = body.get("input") if isinstance(body, dict) else None
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _invalid(start_response, 400, "'input' must be a string or array of strings.")
        if any("moderation-outage" in t for t in texts):
            return _json(start_response, 503, _error("simulated moderation outage", "server_error"))
        results = []
        for text in texts:
            flagged = "forbidden" in text.lower()
            results.append(
                {
                    "flagged": flagged,
                    "categories": {"harassment": flagged, "violence": False},
                    "category_scores": {"harassment": 0.99 if flagged else 0.01, "violence": 0.0},
                }
            )
        answer = {"id": f"modr-{uuid.uuid4().hex}", "model": "simulator", "results": results}
        return _json(start_response, 200, answer)

    def _chat(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        self.total_requests += 1
        try:
            body = json.loads(_read_body(environ) or b"null")
        except ValueError as exc:
            return _invalid(start_response, 400, f"Invalid JSON body: {exc}")
        if not isinstance(body, dict):
            return _invalid(start_response, 400, "The body must be a JSON object.")
        self.requests.append(body)
        if self.refuse_stream_options and "stream_options" in body:
            error = _error("Unrecognized request argument supplied: stream_options",
                           "invalid_request_error", "unknown_parameter")  # fmt: skip
            return _json(start_response, 400, error)
        if forced := environ.get("HTTP_X_SIM_FAIL"):  # a header a routes file may set
            body = {**body, "simulator": {**_options(body), "fail": forced, "fail_after": 0}}
        try:
            plan = make_plan(self._with_defaults(body), self.interval)
        except ValueError as exc:
            return _invalid(start_response, 400, str(exc))

        if plan.fail == "status_500":
            return _json(start_response, 500, _error("simulated server error", "server_error"))
        if plan.fail == "status_429":
            error = _error("simulated rate limit", "rate_limit_error", "rate_limit_exceeded")
            return _json(start_response, 429, error, ("Retry-After", "1"))
        if plan.fail == "status_404":
            model = body.get("model")
            error = _error(f"The model '{model}' does not exist.", "invalid_request_error",
                           "model_not_found")  # fmt: skip
            return _json(start_response, 404, error)
        if plan.fail == "status_400":
            error = _error("simulated bad request", "invalid_request_error", "invalid_value")
            return _json(start_response, 400, error)
        if plan.fail == "retry_after_nan":
            error = _error("simulated rate limit", "rate_limit_error", "rate_limit_exceeded")
            return _json(start_response, 429, error, ("Retry-After", "nan"))
        if plan.fail == "echo_key":
            given = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ")
            error = _error(f"Incorrect API key provided: {given}.", "invalid_request_error")
            return _json(start_response, 401, error)
        if plan.fail == "json_error":
            error = _error("simulated error in a 200 answer", "server_error")
            return _json(start_response, 200, error)
        model = body["model"] if isinstance(body.get("model"), str) else "simulator"
        if body.get("stream"):
            write = start_response(
                "200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
            )
            return self._stream(body, plan, model, write)
        return self._complete(body, plan, model, start_response)

    def _complete(
        self, body: dict, plan: Plan, model: str, start_response: StartResponse
    ) -> Iterable[bytes]:
        """A non-streamed answer, after as long as streaming it would have taken."""
        gevent.sleep(plan.first_delay + plan.interval * len(plan.pieces))
        if plan.fail == "hang":
            gevent.sleep(HANG_SECONDS)
        if plan.fail in ("hang", "error_after"):
            return _json(start_response, 500, _error("simulated server error", "server_error"))
        text = "".join(plan.pieces)
        message = {"role": "assistant", "content": text, "refusal": None}
        if plan.thoughts:
            message["reasoning_content"] = "".join(plan.thoughts)
        answer = {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            ],
            "usage": _usage(body, len(plan.pieces)),
        }
        data = _json(start_response, 200, answer)[0]
        if plan.fail != "drop_after":
            return [data]

        def half_then_drop() -> Iterator[bytes]:
            # Content-Length promises the whole body: stopping halfway is a truncated answer.
            yield data[: len(data) // 2]
            raise SimulatedDrop

        return half_then_drop()

    def _stream(
        self, body: dict, plan: Plan, model: str, write: Callable[[bytes], Any]
    ) -> Iterator[bytes]:
        self.active_streams += 1
        self.peak_streams = max(self.peak_streams, self.active_streams)
        try:
            # pywsgi sends headers with the first non-empty chunk only; first_delay must come
            # after them (a real upstream answers headers as soon as it accepts the request).
            write(b"")
            gevent.sleep(plan.first_delay)
            chunks = _chunks(body, plan, model)
            sent = 0
            for pause, chunk in chunks:
                if plan.fail and sent == plan.fail_after:
                    yield from self._fault(plan)
                    return
                if pause:
                    gevent.sleep(plan.interval)
                if plan.timestamps:
                    chunk["x_sim_emitted_at"] = time.time()
                yield encode_event(chunk, plan.formats)
                sent += 1
            if plan.fail:  # fail_after beyond the last chunk: fail instead of [DONE]
                yield from self._fault(plan)
                return
            yield encode_event("[DONE]", plan.formats)
        finally:
            self.active_streams -= 1

    @staticmethod
    def _fault(plan: Plan) -> Iterator[bytes]:
        if plan.fail == "hang":
            gevent.sleep(HANG_SECONDS)
        elif plan.fail == "drop_after":
            raise SimulatedDrop
        elif plan.fail == "error_after":
            error = _error("simulated mid-stream error", "server_error", "simulated")
            yield encode_event(error, plan.formats)
        elif plan.fail == "odd_chunk":
            yield encode_event({"object": "chat.completion.chunk", "choices": [1]}, plan.formats)
            yield encode_event("[DONE]", plan.formats)


def _chunks(body: dict, plan: Plan, model: str) -> Iterator[tuple[bool, dict]]:
    """The stream's chunks, made lazily, each with whether an interval precedes it."""
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    base = {
        "id": f"chatcmpl-sim-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        # OpenAI sends "usage": null on every chunk but the last when usage is requested.
        return {**base, "choices": [choice], **({"usage": None} if include_usage else {})}

    yield False, chunk({"role": "assistant", "content": ""})
    for thought in plan.thoughts:
        yield True, chunk({"reasoning_content": thought})
    for piece in plan.pieces:
        yield True, chunk({"content": piece})
    yield False, chunk({}, plan.finish_reason)
    if include_usage:
        yield False, {**base, "choices": [], "usage": _usage(body, len(plan.pieces))}


def _read_body(environ: dict) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        return stream.read(int(length))
    # Chunked request bodies: only a self-terminating input may be read to its end.
    return stream.read() if environ.get("wsgi.input_terminated") else b""


def create_app(
    interval: float = 0.02,
    api_key: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    reply: str | None = None,
    models: tuple[str, ...] = ("simulator",),
    reasoning: str | None = None,
    refuse_stream_options: bool = False,
) -> Simulator:
    """The simulator as a WSGI application (serve it with gevent.pywsgi for streaming)."""
    return Simulator(interval=interval, api_key=api_key, tokens=tokens, reply=reply,
                     models=models, reasoning=reasoning,
                     refuse_stream_options=refuse_stream_options)  # fmt: skip


class QuietHandler(WSGIHandler):
    """pywsgi's handler, with Nagle off and a silent connection abort for ``drop_after``."""

    def handle(self) -> None:
        # Small SSE writes must leave at once, not wait for the previous segment's ACK.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        app = self.server.application
        if isinstance(app, Simulator):
            app.connections += 1  # /_sim/stats: how many connections clients opened
        super().handle()

    def handle_error(self, t: type, v: BaseException, tb: Any) -> None:
        if isinstance(v, SimulatedDrop):
            # pywsgi only writes the final "0\r\n\r\n" after the body iterator ends normally;
            # closing now leaves the client with a truncated chunked (or sized) body.
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


def main(argv: list[str] | None = None) -> int:
    """Serve the simulator until SIGTERM or SIGINT (gevent must be monkey-patched first)."""
    parser = argparse.ArgumentParser(
        prog="python -m relay.dev.simulator", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument(
        "--interval", type=float, default=float(os.environ.get("RELAY_SIM_INTERVAL", "0.02"))
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--tokens",
        type=int,
        default=int(os.environ.get("RELAY_SIM_TOKENS", DEFAULT_TOKENS)),
        help="words per reply when a request names none",
    )
    parser.add_argument("--reply", default=None, help="the exact reply when a request names none")
    parser.add_argument(
        "--reasoning", default=None, help="reasoning streamed before each reply that names none"
    )
    parser.add_argument(
        "--refuse-stream-options",
        action="store_true",
        help="answer 400 to a request with stream_options, as some servers do",
    )
    parser.add_argument(
        "--models", default="simulator", help="comma-separated model names /v1/models lists"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.tokens <= MAX_TOKENS:
        parser.error(f"--tokens must be between 0 and {MAX_TOKENS}")

    server = WSGIServer(
        (args.host, args.port),
        create_app(
            args.interval,
            args.api_key,
            args.tokens,
            args.reply,
            tuple(m for m in args.models.split(",") if m),
            args.reasoning,
            args.refuse_stream_options,
        ),  # fmt: skip
        backlog=4096,
        log=None,  # no access log: thousands of streams must stay cheap
        handler_class=QuietHandler,
        environ={"SERVER_NAME": args.host},  # skips pywsgi's reverse-DNS lookup of the host
    )
    server.start()
    print(f"simulator listening on http://{args.host}:{server.server_port}", flush=True)
    stop = Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    stop.wait()
    server.stop(timeout=1)  # hung streams would otherwise hold the exit for HANG_SECONDS
    return 0


if __name__ == "__main__":
    from gevent import monkey

    # relay/__init__ imports nothing eagerly, so this still runs before socket and ssl load.
    monkey.patch_all()
    sys.exit(main())
