"""Where the time to the first chunk goes, packet by packet: ``python -m tests.bench.trace [JOBS]
[--floor]``.

Runs the first-chunk scenario of :mod:`tests.bench.run` (one gunicorn process, one worker, the
epoll upstream; jobs one at a time through ``POST /v1/chat/completions`` from a raw socket)
while ``tcpdump`` captures loopback, then splits each job's time by the packets on the wire:
which process sent what to whom, and when, as the kernel saw it. Needs ``tcpdump`` (Debian's
package) and root, or the capability to capture. Nothing in the relay is instrumented.

Prints, for each step of a job (the n-th packet of a kind on a connection of a kind), its
median time after the client's POST, and the gap to the step before: the difference of the
medians, and the gap's quartiles taken job by job (a step with two modes, such as an upstream
that answers before or after the worker's next write, shows them there). With ``--floor``,
the same for the design's floor chain under gunicorn and Flask (:mod:`tests.bench.floor_chain`:
the same hops with nothing of the relay in them) instead of the relay, step by step beside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.loadgen import request_bytes  # noqa: E402
from tests.conftest import free_port, start_process, wait_for  # noqa: E402

if TYPE_CHECKING:
    from tests.bench.run import Bench

WARMUP = 30


def read_pcap(path: Path) -> list[tuple[float, int, int, bytes]]:
    """(time, source port, destination port, TCP payload) of every packet with a payload."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    nano = magic == 0xA1B23C4D
    linktype = struct.unpack("<I", data[20:24])[0]
    offset, packets = 24, []
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack("<IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        link = {1: 14, 113: 16, 0: 4, 276: 20}.get(linktype, 14)  # ethernet, SLL, null, SLL2
        ip = frame[link:]
        if not ip or ip[0] >> 4 != 4:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20 or ip[9] != 6:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            packets.append((sec + frac / (1e9 if nano else 1e6), sport, dport, payload))
    return packets


def owners(pids: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> the named process (group) whose socket it is (from ``ss -tanp``)."""
    out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
    names = {pid: name for name, pid in pids.items()}
    found: dict[int, str] = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 6 or "pid=" not in line:
            continue
        local_port = int(parts[3].rsplit(":", 1)[1])
        for piece in line.split("pid=")[1:]:
            pid = int(piece.split(",", 1)[0])
            try:
                group = os.getpgid(pid)  # each process fixture runs in its own group
            except ProcessLookupError:
                continue
            if group in names:
                found[local_port] = names[group]
    return found


def label(payload: bytes) -> str:
    """A short name for what a packet carries."""
    head = payload[:120]
    if head.startswith(b"*"):  # a RESP command: its name
        try:
            return head.split(b"\r\n")[2].decode().upper()
        except IndexError:
            return "RESP"
    if head.startswith(b">") or b"smessage" in head[:40]:
        return "push"
    if head.startswith(b"HTTP/"):
        return "HTTP head" + (" + data" if b"data:" in payload else "")
    if head.startswith((b"POST", b"GET")):
        return head.split(b" ", 1)[0].decode()
    if b"data:" in head:
        return "data"
    return "reply"


def start_floor(bench: Bench) -> str:
    """The floor chain under gunicorn and Flask, and its worker, on the bench's Redis and
    upstream; the URL to POST to."""
    from functools import partial

    from tests.bench.floor_chain import accepts

    port, env = free_port(), {"FLOOR_REDIS_PORT": str(bench.redis_port)}
    gunicorn = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b",
                f"127.0.0.1:{port}", "tests.bench.floor_chain:flask_app()"]  # fmt: skip
    worker = [sys.executable, "-m", "tests.bench.floor_chain", "worker", str(bench.redis_port),
              bench.sim]  # fmt: skip
    bench.procs.append(start_process("gunicorn-floor", gunicorn, bench.log_dir, env=env))
    bench.procs.append(start_process("test-worker-floor", worker, bench.log_dir, env=env))
    wait_for(partial(accepts, port), 10, "the floor chain's web process")
    return f"http://127.0.0.1:{port}/"


def quartiles(values: list[float]) -> str:
    values = sorted(values)
    return " ".join(f"{values[int(len(values) * q)]:6.3f}" for q in (0.25, 0.5, 0.75))


def print_steps(jobs: list[dict[str, float]]) -> None:
    """Each step's median time after the POST, the difference from the step before, and the
    quartiles of that gap taken job by job (two modes show as quartiles far apart, which a
    difference of medians hides)."""
    steps: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        for name, at in job.items():
            steps[name].append(at)
    rows = [(median(v), name, len(v)) for name, v in steps.items() if len(v) >= len(jobs) * 0.9]
    rows.sort()
    print(f"{len(jobs)} jobs; median ms after the client's POST (steps seen in >= 90% of jobs),")
    print("the gap from the step before, and that gap's quartiles job by job")
    previous_at, previous = 0.0, ""
    for at, name, count in rows:
        gaps = [job[name] - job.get(previous, 0.0) for job in jobs
                if name in job and (not previous or previous in job)]  # fmt: skip
        print(f"{at:7.3f}  (+{at - previous_at:6.3f} | {quartiles(gaps)})  {name}  [{count}]")
        previous_at, previous = at, name


def main(argv: list[str]) -> int:
    # Imported here: tests.bench.run monkey-patches for gevent when it is imported, which a
    # process that only reads the printing helpers above (a test) must not have done to it.
    from tests.bench.run import Bench, first_chunk_body

    floor = "--floor" in argv
    argv = [a for a in argv if a != "--floor"]
    jobs = int(argv[0]) if argv else 200
    if shutil.which("tcpdump") is None:
        sys.exit("tcpdump is not installed (apt-get install tcpdump)")
    log_dir = Path(tempfile.mkdtemp(prefix="relay-trace-"))
    bench = Bench(False, log_dir)
    capture = log_dir / "lo.pcap"
    dump = None
    try:
        if floor:
            url = start_floor(bench)
        else:
            bench.stack.start_worker()
            url = f"{bench.relay(1)[0]}/v1/chat/completions"
        web_port = urlsplit(url).port
        sim_port = bench.sim_port
        body = request_bytes(url, "POST", first_chunk_body())
        ports = f"port {bench.redis_port} or port {web_port} or port {sim_port}"
        dump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-s", "256", "-B", "16384",
             "--time-stamp-precision=nano", "-w", str(capture), ports],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # tcpdump has no readiness signal; it needs a moment to attach
        sent_at: list[tuple[int, int]] = []  # (client port, job index)
        for n in range(jobs + WARMUP):
            with socket.create_connection(("127.0.0.1", web_port), timeout=10) as sock:
                sent_at.append((sock.getsockname()[1], n))
                sock.sendall(body)
                buf = b""
                while b"data: [DONE]" not in buf:  # to the end, as run.py's first_chunk
                    more = sock.recv(65536)
                    if not more:
                        break
                    buf += more
        pids = {proc.name: proc.popen.pid for proc in bench.stack.procs + bench.procs}
        ports_of = owners(pids)
    finally:
        if dump is not None:
            time.sleep(0.5)
            dump.send_signal(signal.SIGINT)
            dump.wait(10)
        bench.stop()
    packets = read_pcap(capture)
    clients = dict(sent_at)
    peers = {bench.redis_port: "redis", web_port: "web", sim_port: "upstream"}

    def who(port: int, other: int) -> str:
        if port in peers:
            return peers[port]
        if port in clients and other == web_port:  # another process's socket may share its port
            return "client"
        name = ports_of.get(port, "?")
        return "worker" if name.startswith("test-worker") else name.split("-")[0]

    # One job's packets: from its client's first byte until its first data chunk reached it.
    jobs: list[dict[str, float]] = []  # each job's steps, ms after its POST
    starts = [(t, sp) for t, sp, dp, _ in packets if dp == web_port and sp in clients]
    for start, cport in starts:
        if clients[cport] < WARMUP:
            continue
        end = next((t for t, sp, dp, p in packets if t >= start and sp == web_port
                    and dp == cport and b"data: {" in p), None)  # fmt: skip
        if end is None:
            continue
        seen: dict[str, int] = defaultdict(int)
        job: dict[str, float] = {}
        for t, sp, dp, payload in packets:
            if t < start or t > end:
                continue
            src, dst = who(sp, dp), who(dp, sp)
            key = f"{src} -> {dst}: {label(payload)}"
            seen[key] += 1
            job[f"{key} #{seen[key]}"] = (t - start) * 1e3
        job["client gets first chunk"] = (end - start) * 1e3
        jobs.append(job)
    print_steps(jobs)
    print(f"\ncapture: {capture}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
