"""The upstream simulator as a real subprocess, checked over real HTTP (and its pure helpers)."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests

from relay.dev.simulator import reply_finish_reason, reply_pieces, reply_text
from tests.helpers import sdk_text

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Sim:
    base: str
    proc: subprocess.Popen
    log: Path

    def post(self, body: dict, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return requests.post(f"{self.base}/v1/chat/completions", json=body, **kwargs)


@contextmanager
def run_simulator(tmp: Path, *args: str) -> Iterator[Sim]:
    """Start ``python -m relay.dev.simulator`` on a free port; always stop it."""
    port = _free_port()
    log = tmp / f"simulator-{port}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.dev.simulator", "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=1).json() == {"ok": True}:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"simulator did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield Sim(base, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    with run_simulator(tmp_path_factory.mktemp("sim"), "--interval", "0.01") as s:
        yield s


def parse_sse(raw: bytes) -> tuple[list[str], list[str]]:
    """(event data, comment lines) of an SSE body, per the spec's line and field rules."""
    events, comments, data = [], [], []
    for line in re.split(r"\r\n|\r|\n", raw.decode()):
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith(":"):
            comments.append(line)
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    return events, comments


def stream(sim: Sim, body: dict) -> tuple[requests.Response, bytes, list[str]]:
    with sim.post({**body, "stream": True}, stream=True) as response:
        raw = b"".join(response.iter_content(chunk_size=None))
    return response, raw, parse_sse(raw)[0]


def content_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def chat(content: str = "Hello there", **options: object) -> dict:
    body: dict = {"model": "sim-model", "messages": [{"role": "user", "content": content}]}
    if options:
        body["simulator"] = options
    return body


# --- pure helpers ---------------------------------------------------------------------------


def test_default_reply_is_deterministic_words():
    pieces = reply_pieces({})
    assert len(pieces) == 12
    assert pieces[0][0].isupper() and not pieces[0].startswith(" ")
    assert all(p.startswith(" ") and p.strip() == p[1:] for p in pieces[1:])
    assert reply_text({}) == "".join(pieces) == reply_text({"messages": []})
    assert len(reply_pieces(chat(tokens=40))) == 40
    assert reply_text(chat(tokens=0)) == ""


@pytest.mark.parametrize(
    "reply", ["Hello, world!", "  lead\n\nand trail  ", "x", "", "   ", "日本 語"]
)
def test_reply_pieces_keep_the_exact_text(reply):
    pieces = reply_pieces(chat(reply=reply))
    assert "".join(pieces) == reply
    assert all(p.strip() for p in pieces[:-1])


def test_max_tokens_truncates_and_sets_length():
    body = {**chat(tokens=10), "max_tokens": 4}
    assert len(reply_pieces(body)) == 4 and reply_finish_reason(body) == "length"
    assert len(reply_pieces({**chat(tokens=10), "max_completion_tokens": 3})) == 3
    assert reply_finish_reason({**chat(tokens=10), "max_tokens": 10}) == "stop"
    assert reply_finish_reason(chat(tokens=2, finish_reason="content_filter")) == "content_filter"


# --- streaming over HTTP --------------------------------------------------------------------


def test_normal_stream_matches_openai_format(sim):
    body = chat(tokens=7)
    response, raw, events = stream(sim, body)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.headers
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and b"\r" not in raw
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 7 + 1
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-sim-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "sim-model"
        assert isinstance(c["created"], int) and c["system_fingerprint"] is None
        assert "usage" not in c
        (choice,) = c["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:-1]] == [
        {"content": p} for p in reply_pieces(body)
    ]
    assert content_of(chunks) == reply_text(body)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 8 + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_model_defaults_to_simulator(sim):
    _, _, events = stream(sim, {"messages": [], "simulator": {"tokens": 1}})
    assert json.loads(events[0])["model"] == "simulator"


def test_max_tokens_truncation_streams_length(sim):
    body = {**chat(tokens=10), "max_tokens": 4}
    _, _, events = stream(sim, body)
    chunks = [json.loads(e) for e in events[:-1]]
    assert content_of(chunks) == reply_text(body) and len(reply_text(body).split()) == 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_finish_reason_override(sim):
    _, _, events = stream(sim, chat(tokens=2, finish_reason="content_filter"))
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "content_filter"


def test_include_usage_adds_the_usage_chunk(sim):
    body = {**chat("one two three", tokens=5), "stream_options": {"include_usage": True}}
    _, _, events = stream(sim, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *rest, last = chunks
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert all("usage" in c and c["usage"] is None for c in rest)
    assert content_of(chunks) == reply_text(body)


def test_custom_reply_streams_exactly(sim):
    body = chat(reply=" Héllo,\n  wörld! 👋 ")
    _, _, events = stream(sim, body)
    assert content_of([json.loads(e) for e in events[:-1]]) == body["simulator"]["reply"]


def test_chunks_are_spaced_by_the_interval(sim):
    body = chat(tokens=5, interval=0.1, timestamps=True)
    started = time.monotonic()
    _, _, events = stream(sim, body)
    assert time.monotonic() - started >= 0.4
    stamps = [json.loads(e)["x_sim_emitted_at"] for e in events[:-1]]
    assert len(stamps) == 7
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    assert all(g >= 0.09 for g in gaps[:5]), gaps  # before each of the 5 content chunks
    assert abs(stamps[0] - time.time()) < 5


def test_first_delay_comes_after_the_headers(sim):
    started = time.monotonic()
    with sim.post({**chat(tokens=1, first_delay=0.6), "stream": True}, stream=True) as response:
        assert time.monotonic() - started < 0.5  # headers arrived before the delay
        assert response.status_code == 200
        raw = b"".join(response.iter_content(chunk_size=None))
    assert time.monotonic() - started >= 0.6
    assert parse_sse(raw)[0][-1] == "[DONE]"


# --- wire formats ---------------------------------------------------------------------------


def test_crlf_format(sim):
    body = chat(tokens=4, format="crlf")
    _, raw, events = stream(sim, body)
    assert raw.endswith(b"data: [DONE]\r\n\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert content_of([json.loads(e) for e in events[:-1]]) == reply_text(body)


def test_comments_format(sim):
    body = chat(tokens=4, format="comments")
    _, raw, events = stream(sim, body)
    comments = parse_sse(raw)[1]
    assert comments == [": ping"] * len(events)
    assert b"event:" not in raw
    assert content_of([json.loads(e) for e in events[:-1]]) == reply_text(body)


def test_multiline_format(sim):
    body = chat(tokens=4, format=["multiline", "crlf"])
    _, raw, events = stream(sim, body)
    assert raw.count(b"data: ") > 3 * len(events)
    assert all("\n" in e for e in events[:-1]) and events[-1] == "[DONE]"
    assert content_of([json.loads(e) for e in events[:-1]]) == reply_text(body)


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "status", "error_type", "code"),
    [
        ("status_500", 500, "server_error", None),
        ("status_429", 429, "rate_limit_error", "rate_limit_exceeded"),
        ("status_404", 404, "invalid_request_error", "model_not_found"),
        ("status_400", 400, "invalid_request_error", "invalid_value"),
        ("json_error", 200, "server_error", None),
    ],
)
@pytest.mark.parametrize("streamed", [True, False])
def test_error_answers(sim, fail, status, error_type, code, streamed):
    response = sim.post({**chat(fail=fail), "stream": streamed})
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (error_type, code)
    if fail == "status_429":
        assert response.headers["Retry-After"] == "1"


def test_error_after_sends_an_error_event_and_ends_without_done(sim):
    body = chat(tokens=10, fail="error_after", fail_after=3)
    response, _, events = stream(sim, body)
    assert response.status_code == 200
    assert "[DONE]" not in events and len(events) == 4
    assert content_of([json.loads(e) for e in events[:3]]) == "".join(reply_pieces(body)[:2])
    assert json.loads(events[-1]) == {
        "error": {
            "message": "simulated mid-stream error",
            "type": "server_error",
            "param": None,
            "code": "simulated",
        }
    }


@pytest.mark.parametrize("fail_after", [0, 3])
def test_drop_after_breaks_the_connection(sim, fail_after):
    received = b""
    with sim.post({**chat(tokens=10, fail="drop_after", fail_after=fail_after), "stream": True},
                  stream=True) as response:  # fmt: skip
        assert response.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for data in response.iter_content(chunk_size=None):
                received += data
    events = parse_sse(received)[0]
    assert len(events) == fail_after and "[DONE]" not in events


def test_drop_after_breaks_a_non_streamed_answer(sim):
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        sim.post(chat(tokens=10, fail="drop_after"))


def test_hang_keeps_the_connection_open_and_silent(sim):
    body = {**chat(tokens=10, fail="hang", fail_after=2), "stream": True}
    received = b""
    with sim.post(body, stream=True, timeout=(5, 0.7)) as response:
        with pytest.raises(requests.exceptions.ConnectionError, match="timed out"):
            for data in response.iter_content(chunk_size=None):
                received += data
    assert len(parse_sse(received)[0]) == 2


def test_invalid_requests_get_400_in_openai_shape(sim):
    for data in (b"{not json", b"[1, 2]"):
        response = requests.post(
            f"{sim.base}/v1/chat/completions",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    for options in ({"tokens": -1}, {"fail": "nope"}, {"format": "xml"}, {"interval": "1"}):
        assert sim.post(chat(**options)).status_code == 400


# --- other endpoints ------------------------------------------------------------------------


def test_non_streamed_answer(sim):
    body = {**chat("a b", tokens=6), "max_tokens": 5}
    answer = sim.post(body).json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-sim-")
    assert answer["model"] == "sim-model"
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply_text(body)
    assert choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_requests_are_recorded_oldest_first_and_bounded(sim):
    assert requests.delete(f"{sim.base}/_sim/requests", timeout=5).ok
    first, second = chat("first", tokens=1), {**chat("second", tokens=1), "stream": True}
    sim.post(first)
    stream(sim, second)
    assert requests.get(f"{sim.base}/_sim/requests", timeout=5).json() == [first, second]
    with requests.Session() as session:
        for i in range(1005):
            body = {"messages": [], "n_": i, "simulator": {"tokens": 0, "interval": 0}}
            session.post(f"{sim.base}/v1/chat/completions", json=body, timeout=5)
    recorded = requests.get(f"{sim.base}/_sim/requests", timeout=5).json()
    assert [r["n_"] for r in recorded] == list(range(5, 1005))
    requests.delete(f"{sim.base}/_sim/requests", timeout=5)
    assert requests.get(f"{sim.base}/_sim/requests", timeout=5).json() == []


def test_stats_count_active_streams(sim):
    def stats() -> dict:
        return requests.get(f"{sim.base}/_sim/stats", timeout=5).json()

    before = stats()
    body = {**chat(tokens=20, interval=0.2), "stream": True}
    with sim.post(body, stream=True) as response:
        next(response.iter_content(chunk_size=None))
        during = stats()
    assert during["active_streams"] == before["active_streams"] + 1
    assert during["total_requests"] == before["total_requests"] + 1
    # The server notices the closed connection at its next write.
    deadline = time.monotonic() + 5
    while stats()["active_streams"] != before["active_streams"]:
        assert time.monotonic() < deadline, "the abandoned stream is still counted"
        time.sleep(0.05)


def test_models_and_unknown_paths(sim):
    models = requests.get(f"{sim.base}/v1/models", timeout=5).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "simulator"
    assert requests.get(f"{sim.base}/nope", timeout=5).status_code == 404


def test_openai_sdk_reassembles_the_reply(sim):
    client = openai.OpenAI(base_url=f"{sim.base}/v1", api_key="x", max_retries=0)
    body = chat(tokens=15)
    with client.chat.completions.create(
        model="sim-model",
        messages=body["messages"],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"simulator": body["simulator"]},
    ) as stream:
        chunks = list(stream)
    text, reasons = sdk_text(chunks)
    usage = next((c.usage for c in reversed(chunks) if c.usage), None)
    assert text == reply_text(body)
    assert reasons == ["stop"]
    assert usage is not None and usage.completion_tokens == 15
    completion = client.chat.completions.create(
        model="sim-model", messages=body["messages"], extra_body={"simulator": body["simulator"]}
    )
    assert completion.choices[0].message.content == reply_text(body)
    client.close()


def test_many_concurrent_slow_streams(sim):
    """500 streams of ~1 s each, all at once: served concurrently, not one after another."""
    n = 500
    payload = json.dumps({**chat(tokens=10, interval=0.1), "stream": True}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytearray] = {}
    started = time.monotonic()
    port = int(sim.base.rsplit(":", 1)[1])
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(request)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            received[sock] = bytearray()
        open_count = n
        while open_count:
            assert time.monotonic() - started < 20, "streams did not finish in time"
            for key, _ in selector.select(timeout=1):
                data = key.fileobj.recv(65536)
                if data:
                    received[key.fileobj] += data
                else:
                    selector.unregister(key.fileobj)
                    open_count -= 1
    finally:
        for sock in received:
            sock.close()
        selector.close()
    elapsed = time.monotonic() - started
    assert all(bytes(b).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") for b in received.values())
    assert elapsed < 10, elapsed  # sequentially this would take 500 s


# --- processes with other options -----------------------------------------------------------


def test_api_key_is_required_when_set(tmp_path):
    with run_simulator(tmp_path, "--api-key", "sekrit") as s:
        response = s.post(chat(tokens=1))
        assert response.status_code == 401
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        bad = s.post(chat(tokens=1), headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        assert requests.get(f"{s.base}/v1/models", timeout=5).status_code == 401
        good = s.post(chat(tokens=1), headers={"Authorization": "Bearer sekrit"})
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]
        assert requests.get(f"{s.base}/healthz", timeout=5).ok


def test_announces_itself_and_stops_cleanly_on_sigterm(tmp_path):
    with run_simulator(tmp_path) as s:
        port = s.base.rsplit(":", 1)[1]
        # A hung stream must not hold the shutdown.
        hung = s.post({**chat(fail="hang"), "stream": True}, stream=True)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(8) == 0
        hung.close()
        output = s.log.read_text()
        assert output.splitlines()[0] == f"simulator listening on http://127.0.0.1:{port}"
        assert "Traceback" not in output, output


def test_reasoning_streams_first_as_reasoning_content_and_can_be_the_servers_default(sim, tmp_path):
    body = chat(tokens=3, reasoning="Let me think. <b>Twice</b>")
    _, _, events = stream(sim, body)
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    thoughts = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    assert thoughts == ["Let", " me", " think.", " <b>Twice</b>"]
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])
    assert content_of(chunks) == reply_text(body)  # the reasoning is not content
    whole = sim.post(body).json()["choices"][0]["message"]
    assert whole["reasoning_content"] == "Let me think. <b>Twice</b>"
    assert whole["content"] == reply_text(body)
    assert "reasoning_content" not in sim.post(chat(tokens=1)).json()["choices"][0]["message"]
    with run_simulator(tmp_path, "--reasoning", "Hmm.", "--reply", "Yes.") as s:
        message = s.post(chat()).json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("Hmm.", "Yes.")
        own = s.post(chat(reasoning="Own.", tokens=1)).json()["choices"][0]["message"]
        assert (own["reasoning_content"], own["content"]) == ("Own.", reply_text(chat(tokens=1)))
