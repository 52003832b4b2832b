"""A slow viewer that stops reading, against real processes: the other viewers' timing is
unaffected, the relay's memory stays bounded, the slow one is cut off after
``SEND_TIMEOUT_SECONDS`` without progress, and it resumes with Last-Event-ID.

The stalled client is a raw socket with a small receive buffer that sends its GET and then
never calls ``recv``. Its progress and the relay's side of its connection are watched in
``/proc/net/tcp`` (the relay's send queue for it stops growing once its write blocks; the
relay's socket leaves ESTABLISHED when the relay closes it), the relay's memory in
``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import wait_for
from tests.helpers import chat_body, children, create_job, read_stream
from worker.sse_decoder import SSEDecoder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SEND_TIMEOUT = 2.0
QUEUE_SIZE = 64  # the relay's per-viewer mailbox, in events
DELTA_CHARS = 4000  # each content delta; an event is about 4.3 kB on the wire
PIECES = 2500  # about 11 MB per viewer over the job
INTERVAL = 0.002  # the simulator's pause before each content chunk
NORMAL_VIEWERS = 2
# The relay's growth allowed while the stalled viewer falls ~10 MB behind. A mailbox that kept
# the events it missed only until its cut-off (~2 s of the job) would hold ~7 MB; measured
# growth is under 1 MB.
RSS_BOUND = 3 * 1024 * 1024
# While it resumes: the relay reads the replay log a page of 500 events (~2 MB here) at a time
# (measured: up to 3.9 MB); reading the ~10 MB it missed at once would exceed this. What the
# resume's pages took may stay with the process's allocator once everyone has left (2.3-3.8 MB
# measured), so the same bound holds afterwards: keeping the ~10 MB missed would exceed it.
RESUME_RSS_BOUND = 8 * 1024 * 1024
TCP_ESTABLISHED = 1


def job_body() -> dict:
    # Distinct words of DELTA_CHARS characters: each piece is one big delta.
    words = [f"{i:06d}" + "x" * (DELTA_CHARS - 7) for i in range(PIECES)]
    return chat_body(
        "slow viewer", reply=" ".join(words), interval=INTERVAL, first_delay=1.0, timestamps=True
    )


# -- what the relay process and the kernel say ---------------------------------------------------


def relay_worker_pid(master_pid: int) -> int:
    """The pid of gunicorn's (single) worker process, a child of the master."""
    found = children(master_pid)
    assert len(found) == 1, f"gunicorn master {master_pid} has children {found}"
    return found.pop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _hex_endpoint(host: str, port: int) -> str:
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def server_side(local: tuple[str, int], peer: tuple[str, int]) -> tuple[int, int] | None:
    """(TCP state, send queue bytes) of the relay's socket ``local`` connected to ``peer``."""
    want_local, want_peer = _hex_endpoint(*local), _hex_endpoint(*peer)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want_local and parts[2] == want_peer:
            tx_queue = parts[4].split(":")[0]
            return int(parts[3], 16), int(tx_queue, 16)
    return None


class PeakRss(threading.Thread):
    """Samples a process's RSS every 20 ms: :meth:`take` gives the highest since the last."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._done = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._done.wait(0.02):
            try:
                rss = rss_bytes(self.pid)
            except (OSError, AssertionError):  # gone: the test failed and tears down
                return
            with self._lock:
                self.peak = max(self.peak, rss)

    def take(self) -> int:
        rss = rss_bytes(self.pid)
        with self._lock:
            peak, self.peak = max(self.peak, rss), rss
        return peak

    def stop(self) -> int:
        self._done.set()
        self.join(5)
        return self.take()


def viewers(base: str) -> int:
    return requests.get(f"{base}/healthz", timeout=2).json()["viewers"]


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Timed:
    """A normal viewer's events with their arrival times and receipt latencies."""

    ids: list[int] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def max_gap(self) -> float:
        # From the first content chunk on (the first one waits for the simulator's start).
        times = self.arrivals[1:]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    @property
    def duration(self) -> float:
        return self.arrivals[-1] - self.arrivals[1]


def read_timed(url: str, out: Timed, timeout: float = 40.0) -> None:
    """Read the stream to [DONE], recording when each event arrived and how late it was."""
    try:
        deadline = time.monotonic() + timeout
        with requests.get(url, stream=True, timeout=(5, 10)) as response:
            assert response.status_code == 200, response.text
            decoder = SSEDecoder()
            for block in response.iter_content(chunk_size=None):
                now_mono, now_wall = time.monotonic(), time.time()
                for event in decoder.feed(block):
                    out.ids.append(int(event.id))
                    out.data.append(event.data)
                    out.arrivals.append(now_mono)
                    if event.data == "[DONE]":
                        return
                    emitted = json.loads(event.data).get("x_sim_emitted_at")
                    if emitted is not None:
                        out.latencies.append(now_wall - emitted)
                if now_mono > deadline:
                    raise TimeoutError(f"{url} did not end within {timeout}s")
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        out.error = exc


def start_viewers(url: str, count: int) -> tuple[list[Timed], list[threading.Thread]]:
    results = [Timed() for _ in range(count)]
    threads = [threading.Thread(target=read_timed, args=(url, r), daemon=True) for r in results]
    for thread in threads:
        thread.start()
    return results, threads


def join_viewers(results: list[Timed], threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a normal viewer did not finish"
    for result in results:
        assert result.error is None, result.error
        assert result.data[-1] == "[DONE]" and result.data.count("[DONE]") == 1
        assert result.ids == list(range(1, len(result.ids) + 1))


def stalled_client(url: str) -> socket.socket:
    """A client that asks for the stream, then never reads: its receive buffer is small."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connecting: a small window, and a small MSS, from which the relay's kernel sizes
    # its send buffer for this connection (~100 kB instead of ~3 MB on loopback), so that the
    # relay's writes block after a few dozen events.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
    sock.settimeout(10)
    sock.connect((parts.hostname, parts.port))
    request = (
        f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    )
    sock.sendall(request.encode())
    return sock


def drain(sock: socket.socket) -> tuple[bytes, str]:
    """Everything left to read on ``sock`` and how it ended ("eof" or "reset")."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)


def dechunk(raw: bytes) -> Iterator[bytes]:
    """The body of a chunked HTTP/1.1 response cut off anywhere: the bytes that did arrive."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200"), head[:200]
    assert b"transfer-encoding: chunked" in head.lower(), head
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return
        yield rest[:size]
        rest = rest[size + 2 :]


# -- the test ------------------------------------------------------------------------------------


def watch_until_cut_off(local: tuple[str, int], peer: tuple[str, int]) -> tuple[float, int]:
    """Wait for the relay to close its side of the stalled connection: (seconds from the
    relay's last successful write to it until then, bytes the relay had queued for it).

    The relay's send queue for the connection grows while its writes succeed and stops once
    the client's window and the relay's send buffer are full: that is the last progress.
    """
    last_tx, last_progress = -1, time.monotonic()
    while time.monotonic() - last_progress < SEND_TIMEOUT + 5:
        now = time.monotonic()
        seen = server_side(peer, local)
        if seen is None or seen[0] != TCP_ESTABLISHED:
            return now - last_progress, last_tx
        if seen[1] != last_tx:
            last_tx, last_progress = seen[1], now
        time.sleep(0.02)
    raise AssertionError(
        f"the relay kept a viewer that took no bytes for {time.monotonic() - last_progress:.1f}s "
        f"({last_tx} bytes queued for it; RELAY_SEND_TIMEOUT_SECONDS={SEND_TIMEOUT})"
    )


def test_stalled_viewer_is_cut_off_without_slowing_others_or_growing_memory(stack):
    started = time.monotonic()
    base = stack.start_web(
        env={
            "RELAY_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT),
            "RELAY_VIEWER_QUEUE_SIZE": str(QUEUE_SIZE),
            "RELAY_MAX_BODY_BYTES": str(32 * 1024 * 1024),
            # A fixed threshold: freed big blocks go back to the system, so that RSS follows
            # what the relay holds (glibc's adaptive one keeps tens of MB of freed heap).
            "MALLOC_MMAP_THRESHOLD_": "131072",
            "MALLOC_TRIM_THRESHOLD_": "1048576",
        }
    )
    stack.start_worker()
    relay_pid = relay_worker_pid(stack.procs[0].popen.pid)
    rss_at_start = rss_bytes(relay_pid)

    # Baseline: the same job shape, normal viewers only.
    baseline_job = create_job(base, job_body())
    baseline, threads = start_viewers(baseline_job["events_url"], NORMAL_VIEWERS)
    join_viewers(baseline, threads)
    wait_for(lambda: viewers(base) == 0, 10, "the baseline viewers to detach")

    # The same again, with a viewer that stops reading at once. (Memory is watched from after
    # the job's creation: parsing and storing its 10 MB request body takes a passing 30 MB.)
    job = create_job(base, job_body())
    rss = PeakRss(relay_pid)
    rss_before = rss.peak
    rss.start()
    with contextlib.closing(stalled_client(job["events_url"])) as slow:
        wait_for(lambda: viewers(base) == 1, 10, "the stalled viewer to attach")
        normal, threads = start_viewers(job["events_url"], NORMAL_VIEWERS)
        cut_off_after, queued = watch_until_cut_off(slow.getsockname(), slow.getpeername())
        cut_at = time.monotonic()
        # The relay let go of it (the normal viewers may still be attached).
        wait_for(lambda: viewers(base) <= NORMAL_VIEWERS, 5, "the stalled viewer to detach")
        # It reads again: what it had been sent, then the end of the connection.
        raw, ending = drain(slow)
        rss_stalled = rss.take()
    decoder = SSEDecoder()
    first = [e for body in dechunk(raw) for e in decoder.feed(body)]
    got_ids = [int(e.id) for e in first if e.id]
    last_id = got_ids[-1] if got_ids else 0
    rest, _ = read_stream(job["events_url"], headers={"Last-Event-ID": str(last_id)}, timeout=40)

    join_viewers(normal, threads)
    wait_for(lambda: viewers(base) == 0, 10, "every viewer to detach")
    rss_resumed = rss.stop()
    rss_after = rss_bytes(relay_pid)

    whole = normal[0]
    n_events = len(whole.ids)
    behind = sum(len(d) for d in whole.data[last_id:])
    figures = {
        "events": n_events,
        "stalled_received_events": len(got_ids),
        "stalled_received_bytes": len(raw),
        "relay_queued_bytes": queued,
        "stalled_behind_bytes": behind,
        "ending": ending,
        "cut_off_after_s": round(cut_off_after, 2),
        "cut_off_before_done_s": round(whole.arrivals[-1] - cut_at, 2),
        "baseline_max_gap_s": [round(r.max_gap, 3) for r in baseline],
        "max_gap_s": [round(r.max_gap, 3) for r in normal],
        "baseline_max_latency_s": [round(max(r.latencies), 3) for r in baseline],
        "max_latency_s": [round(max(r.latencies), 3) for r in normal],
        "baseline_duration_s": [round(r.duration, 2) for r in baseline],
        "duration_s": [round(r.duration, 2) for r in normal],
        "rss_at_start_mb": round(rss_at_start / 2**20, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_stalled_mb": round(rss_stalled / 2**20, 1),
        "rss_peak_resumed_mb": round(rss_resumed / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "run_s": round(time.monotonic() - started, 1),
    }
    print(figures)

    # Cut off once its writes had made no progress for the send timeout (plus polling and one
    # write), while the job was still streaming to the others; the connection ended cleanly.
    assert SEND_TIMEOUT - 0.5 <= cut_off_after <= SEND_TIMEOUT + 1.5, figures
    assert whole.arrivals[-1] > cut_at, figures
    assert ending == "eof", figures
    assert behind > 2 * RSS_BOUND, f"the stalled viewer must fall MBs behind: {figures}"

    # Resumed: every event exactly once, in order, one [DONE]; the same as a normal viewer's.
    ids = got_ids + rest.ids
    data = [e.data for e in first if e.id] + rest.data
    assert ids == list(range(1, n_events + 1)), "an event was lost or repeated"
    assert data == whole.data and data.count("[DONE]") == 1

    # The others were not held up: a write blocked for the stalled viewer would show as a gap
    # (and a latency) of about SEND_TIMEOUT in every other viewer.
    worst_gap = max(r.max_gap for r in baseline)
    worst_latency = max(max(r.latencies) for r in baseline)
    slowest = max(r.duration for r in baseline)
    for result in normal:
        assert result.max_gap < min(worst_gap + 0.5, SEND_TIMEOUT / 2), figures
        assert max(result.latencies) < min(worst_latency + 0.5, SEND_TIMEOUT / 2), figures
        assert result.duration < slowest * 1.3 + 0.5, figures

    # Memory stayed bounded although the stalled viewer was MBs behind, while it resumed, and
    # once everyone had left.
    assert rss_stalled - rss_before < RSS_BOUND, figures
    assert rss_resumed - rss_before < RESUME_RSS_BOUND, figures
    assert rss_after - rss_before < RESUME_RSS_BOUND, figures
    assert time.monotonic() - started < 60, figures
