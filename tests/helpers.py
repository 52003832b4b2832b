"""Client-side helpers for tests: read an SSE stream with the worker's own strict decoder."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from relay.core import keys, queue
from worker.sse_decoder import SSEDecoder


@dataclass
class Received:
    ids: list[int]
    data: list[str]
    comments_or_retry_seen: bool = False

    @property
    def done(self) -> bool:
        return bool(self.data) and self.data[-1] == "[DONE]"

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(d) for d in self.data if d != "[DONE]"]

    @property
    def text(self) -> str:
        """The assistant text reassembled from the chunks' deltas."""
        out = []
        for chunk in self.chunks:
            for choice in chunk.get("choices") or ():
                out.append((choice.get("delta") or {}).get("content") or "")
        return "".join(out)

    @property
    def errors(self) -> list[dict]:
        return [c["error"] for c in self.chunks if c.get("error")]

    @property
    def finish_reasons(self) -> list[str]:
        return [
            ch["finish_reason"]
            for c in self.chunks
            for ch in c.get("choices") or ()
            if ch.get("finish_reason")
        ]


def read_stream(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    max_events: int | None = None,
    timeout: float = 20.0,
    method: str = "GET",
    json_body: dict | None = None,
) -> tuple[Received, requests.Response]:
    """Read events until ``[DONE]``, ``max_events``, or the end; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    response = requests.request(
        method, url, headers=headers, json=json_body, stream=True, timeout=(5, timeout)
    )
    received = Received([], [])
    if response.status_code != 200:
        response.close()
        return received, response
    decoder = SSEDecoder()
    try:
        for block in response.iter_content(chunk_size=None):
            for event in decoder.feed(block):
                received.ids.append(int(event.id) if event.id else -1)
                received.data.append(event.data)
                if event.data == "[DONE]" or (max_events and len(received.data) >= max_events):
                    return received, response
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {url} did not end within {timeout}s: {received}")
    finally:
        response.close()
    return received, response


def pipelined(redis: Any) -> Callable[[list[tuple[Any, ...]]], list[Any]]:
    """Run commands as one redis-py pipeline, errors as values: an executor for
    ``JobStore.publish_many`` on fakeredis (production sends them on a RawConnection)."""

    def execute(commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)

    return execute


def queued(redis: Any, key: str = keys.PENDING) -> list[str]:
    """The ids of the jobs on a queue list (the pending list, or a worker's claimed list)."""
    return [queue.read_entry(raw).job_id for raw in redis.lrange(key, 0, -1)]


def publish(store: Any, job_id: str, attempt: int, events: list[str], text: str = "") -> int:
    """One job's publish through ``JobStore.publish_many``: its last event id, or 0."""
    (result,) = store.publish_many([(job_id, attempt, events, text)], pipelined(store.redis))
    if isinstance(result, Exception):
        raise result
    return result


def stored_message(conversations: Any, message_id: str, owner: str = "") -> dict | None:
    """The message a handed-out id names, as stored: ``{"role", "content", "parent"}``."""
    position = conversations.find(message_id, owner)
    if position is None:
        return None
    record = conversations.redis.hget(
        keys.conversation(position.conversation_id), f"m:{position.number}"
    )
    if record is None:
        return None
    _tokens, parent, role, content = record.decode().split(" ", 3)
    return {"role": role, "content": json.loads(content), "parent": parent}


def sdk_text(chunks: Any) -> tuple[str, list[str]]:
    """The text and finish reasons of an ``openai`` SDK stream of chunks."""
    text, reasons = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return text, reasons


def chat_body(content: str = "Hello", **simulator: object) -> dict:
    """A Chat Completions request; ``simulator`` options steer the test upstream."""
    body: dict = {"model": "simulator", "messages": [{"role": "user", "content": content}]}
    if simulator:
        body["simulator"] = simulator
    return body


def create_job(base: str, body: dict) -> dict:
    """POST /v1/jobs and return the 202 answer."""
    response = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def status_url(response: requests.Response) -> str:
    """The tokened status URL of the job behind a streamed ``/v1/chat/completions`` answer."""
    return response.headers["X-Relay-Events-Url"].replace("/events?", "?", 1)


TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')


class Monitor:
    """Every command one Redis runs, as (client address, [arguments]), from ``MONITOR``."""

    def __init__(self, url: str) -> None:
        parts = urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.file = self.sock.makefile("rb")
        assert self.file.readline() == b"+OK\r\n"
        self.commands: list[tuple[str, list[bytes]]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.sock.settimeout(None)
        for line in self.file:
            # +1700000000.123456 [0 127.0.0.1:5000] "EVALSHA" "..." ...
            head, _, rest = line.partition(b"] ")
            client = head.rpartition(b" ")[2].decode()
            args = [unescape(m) for m in TOKEN.findall(rest)]
            if args:
                self.commands.append((client, args))

    def stop(self) -> list[tuple[str, list[bytes]]]:
        self.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end of the stream
        self.thread.join(5)
        self.file.close()  # the socket is only released once its file is closed too
        self.sock.close()
        return list(self.commands)


def unescape(token: bytes) -> bytes:
    return re.sub(
        rb"\\(x[0-9a-f]{2}|.)",
        lambda m: bytes([int(m[1][1:], 16)]) if m[1].startswith(b"x")
        else {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}.get(m[1], m[1]),
        token,
    )  # fmt: skip


def read_request(conn: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes] | None:
    """One HTTP request with a ``Content-Length`` body, read off ``conn`` after ``buffered``
    (bytes read already): its head, its body, and what came after them; None if the peer
    closed (or the connection failed) before a whole head."""
    while b"\r\n\r\n" not in buffered:
        try:
            data = conn.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        buffered += data
    head, _, buffered = buffered.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
    while len(buffered) < length:
        buffered += conn.recv(65536)
    return head, buffered[:length], buffered[length:]


def children(pid: int) -> set[int]:
    """The pids of a process's children (gunicorn's worker processes, of its master)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("PPid", "0").strip()) == pid:
            found.add(int(entry.name))
    return found
