"""The benchmark suite: the relay beside the direct upstream (the floor) and flask-sse (the peer).

    bash tests/bench/run.sh            # the full suite; rewrites tests/bench/RESULTS.md + p99.png
    bash tests/bench/run.sh --smoke    # a tiny version (what CI runs), written to a temp dir

Every scenario starts from real processes on free ports: redis-server, the simulator's
streams (served by :mod:`tests.bench.upstream`; each chunk carries its emit time), gunicorn
-k gevent serving the relay, worker processes, and gunicorn -k gevent serving flask-sse with the
same settings. Viewers are held by load generator processes (:mod:`tests.bench.loadgen`, one
epoll loop each). Latency is the simulator's emit timestamp to the kernel's receipt of the
event's bytes on the viewer's socket, so it includes everything between the model and the
screen but the measuring client's own wait for a core.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from array import array  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402
from gevent.pool import Pool  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.loadgen import DATA, STAMP, request_bytes  # noqa: E402
from tests.conftest import Proc, Stack, free_port, start_process, wait_for  # noqa: E402

INTERVAL = 0.02  # a chunk every 20 ms: 50 tokens/s, a fast model
FIRST_INTERVAL = 0.005  # the first-chunk jobs' 3 tokens: short jobs, one after another


@dataclass
class Row:
    """One line of the result table."""

    scenario: str
    system: str  # relay, flask-sse, floor
    load: str
    viewers: int = 0
    samples: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    result: str = ""
    extra: dict = field(default_factory=dict)

    def cells(self) -> list[str]:
        def ms(v: float | None) -> str:
            return "" if v is None else f"{v:.1f}"

        return [self.scenario, self.system, self.load, ms(self.p50_ms), ms(self.p99_ms),
                ms(self.max_ms), self.result]  # fmt: skip


def latency_row(scenario: str, system: str, load: str, viewers: int, values, result: str,
                **extra) -> Row:  # fmt: skip
    s = summarise(values)
    if not s.samples:  # e.g. viewers still connecting when the last chunk went out
        result = f"NOT MEASURED: no event emitted once every viewer was connected; {result}"
        return Row(scenario, system, load, viewers, 0, None, None, None, result, extra)
    return Row(scenario, system, load, viewers, s.samples, s.p50 * 1e3, s.p99 * 1e3,
               s.max * 1e3, result, extra)  # fmt: skip


@dataclass(frozen=True)
class Summary:
    samples: int
    p50: float
    p99: float
    max: float


def summarise(values) -> Summary:
    """p50, p99 and max of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return Summary(0, float("nan"), float("nan"), float("nan"))

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]

    return Summary(len(ordered), rank(0.50), rank(0.99), ordered[-1])


@dataclass
class Seen:
    """What a group of viewers saw (from :mod:`tests.bench.loadgen`)."""

    emitted: array
    received: array
    events: list[int]
    errors: list[str]
    cpu_seconds: float = 0.0  # the load generators' own CPU time while viewers were connected

    def latencies(self, since: float) -> list[float]:
        """Emit-to-receipt times of events emitted at or after ``since`` (wall clock)."""
        return [r - e for e, r in zip(self.emitted, self.received, strict=True) if e >= since]

    def spreads(self, since: float) -> list[float]:
        """For each event emitted at or after ``since``: its last viewer's receipt minus its
        first's (how long one event's fan-out took, as the viewers' kernels saw it)."""
        first: dict[float, float] = {}
        last: dict[float, float] = {}
        for e, r in zip(self.emitted, self.received, strict=True):
            if e >= since:
                first[e] = min(first.get(e, r), r)
                last[e] = max(last.get(e, r), r)
        return [last[e] - first[e] for e in first]

    def rate(self, since: float) -> float:
        """Delivered stamped events per second, from ``since`` to the last receipt."""
        kept = [r for e, r in zip(self.emitted, self.received, strict=True) if e >= since]
        return len(kept) / (max(kept) - min(kept)) if len(kept) > 1 else 0.0


class Viewers:
    """Viewers held by load generator processes (``clients`` of them share ``urls``)."""

    _ids = itertools.count()

    def __init__(
        self, urls: list[str], log_dir: Path, *, method: str = "GET", body: bytes = b"",
        timeout: float = 120.0, ready_on: str = "headers", clients: int = 1, nice: int = 0,
    ) -> None:  # fmt: skip
        self.dirs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        clients = max(1, min(clients, len(urls)))
        for k in range(clients):
            work = log_dir / f"viewers-{next(self._ids)}"
            work.mkdir()
            (work / "urls").write_text("\n".join(urls[k::clients]))
            cmd = ["nice", "-n", str(nice), sys.executable, "-m", "tests.bench.loadgen",
                   "--urls", str(work / "urls"),
                   "--out", str(work), "--method", method, "--timeout", str(timeout),
                   "--ready-on", ready_on]  # fmt: skip
            if body:
                (work / "body").write_bytes(body)
                cmd += ["--body", str(work / "body")]
            self.dirs.append(work)
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                               stderr=open(work / "stderr", "w")))  # fmt: skip

    def wait_ready(self) -> float:
        """Block until every viewer is connected; when that was (wall clock)."""
        times = []
        for proc, work in zip(self.procs, self.dirs, strict=True):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("ready"):
                raise RuntimeError(
                    f"load generator failed: {(work / 'stderr').read_text()[-2000:]}"
                )
            times.append(float(line.split()[1]))
        return max(times)

    def seen(self, timeout: float) -> Seen:
        """Wait for every viewer to finish; what they saw."""
        out = Seen(array("d"), array("d"), [], [])
        for proc, work in zip(self.procs, self.dirs, strict=True):
            proc.wait(timeout)
            if proc.returncode:
                raise RuntimeError(
                    f"load generator failed: {(work / 'stderr').read_text()[-2000:]}"
                )
            result = json.loads((work / "result.json").read_text())
            out.events += result["events"]
            out.errors += result["errors"]
            out.cpu_seconds += result["cpu_seconds"]
            for name in ("emitted", "received"):
                with open(work / f"{name}.bin", "rb") as f:
                    getattr(out, name).frombytes(f.read())
        return out


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model or platform.machine()}), {mem:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}, loopback"
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_profiles = itertools.count(1)


class CpuMeter:
    """Cores each part of the stack used between :meth:`start` and :meth:`stop`.

    On two shared cores the parts compete: this is what says which one a scenario is short of.
    """

    def __init__(self, parts: dict[str, list[int]], profile: Path | None = None) -> None:
        self.parts = parts  # role -> pids (the gunicorns' workers, not their masters)
        self.before: dict[str, float] = {}
        self.started = 0.0
        self.profile = profile  # py-spy the worker and web processes into this folder
        self._spies: list[subprocess.Popen] = []

    def _sample(self) -> dict[str, float]:
        return {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in self.parts.items()}

    def start(self, at: float = 0.0) -> None:
        """Start at monotonic time ``at`` (when the chunks begin), or now if that has passed."""
        gevent.sleep(max(0.0, at - time.monotonic()))
        self.before, self.started = self._sample(), time.monotonic()
        if self.profile is not None:
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            for role in ("worker", "web"):
                for pid in self.parts[role]:
                    out = self.profile / f"{next(_profiles):02d}-{role}-{pid}.txt"
                    self._spies.append(subprocess.Popen(
                        [spy, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(out),
                         "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    ))  # fmt: skip

    def stop(self, clients_cpu: float) -> dict[str, float]:
        """Cores per role (``clients``: the load generators' own figure)."""
        for spy in self._spies:  # py-spy writes its profile on SIGINT
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        after, wall = self._sample(), time.monotonic() - self.started
        cores = {role: (after[role] - self.before[role]) / wall for role in self.parts}
        cores["clients"] = clients_cpu / wall
        return {role: round(value, 2) for role, value in cores.items()}


def sim_body(tokens: int, *, first_delay: float = 0.0, interval: float = INTERVAL,
             stream: bool | None = None) -> dict:  # fmt: skip
    body: dict = {
        "model": "simulator",
        "messages": [{"role": "user", "content": "bench"}],
        "simulator": {"tokens": tokens, "interval": interval, "timestamps": True,
                      "first_delay": first_delay},
    }  # fmt: skip
    if stream is not None:
        body["stream"] = stream
    return body


def first_chunk_body() -> bytes:
    """The request of every first-chunk measurement: three short tokens, streamed."""
    return json.dumps(sim_body(3, interval=FIRST_INTERVAL, stream=True)).encode()


def on(base: str, url: str) -> str:
    """``url`` (from a job's creation answer) on the relay at ``base``."""
    parts = urlsplit(url)
    return f"{base}{parts.path}?{parts.query}" if parts.query else f"{base}{parts.path}"


def time_to_first_chunk(
    url: str, body: bytes, *, leave: bool = False, headers: dict[str, str] | None = None
) -> float | None:
    """Seconds from connecting and POSTing ``body`` to the first ``data:`` line (None if the
    stream ended before one). The stream is then read to its end, as a chat client does, or,
    with ``leave``, the client hangs up at once (the relay then cancels the job)."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request_bytes(url, "POST", body, headers))
        buf = b""
        while not DATA.search(buf):
            more = sock.recv(65536)
            if not more:
                return None
            buf += more
        took = time.monotonic() - started
        while not leave and b"data: [DONE]" not in buf:
            if not (more := sock.recv(65536)):
                break
            buf = buf[-16:] + more
    return took


def connect_lead(viewers: int) -> float:
    """Time to give viewers to connect before the first chunk.

    One gunicorn process takes 500-1,000 new streams a second (each subscribes and reads the
    log first); a run whose viewers were not all connected before the last chunk measured
    nothing (the row says so: no samples).
    """
    return 2.0 + viewers / 400


class Bench:
    """The processes of a run, and the scenarios run against them."""

    def __init__(self, smoke: bool, log_dir: Path, clients: int = 1, nice: int = 0,
                 profile: Path | None = None) -> None:  # fmt: skip
        self.smoke = smoke
        self.profile = profile
        self.clients = clients
        self.nice = nice
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.rows: list[Row] = []
        binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
        # Two Redis servers: the relay's and the peer's, so each one's connections are its own.
        self.redis_port, self.peer_redis_port, self.sim_port = free_port(), free_port(), free_port()
        for name, port in (("redis", self.redis_port), ("peer-redis", self.peer_redis_port)):
            self.procs.append(start_process(name, [binary, "--port", str(port), "--save", "",
                                                   "--appendonly", "no", "--maxclients", "15000"],
                                            log_dir))  # fmt: skip
        # The simulator's chunks from one epoll loop: relay.dev.simulator (a greenlet per stream)
        # took up to half a core from the system under test (tests/bench/upstream.py).
        upstream = [sys.executable, "-m", "tests.bench.upstream", "--port", str(self.sim_port)]
        self.procs.append(start_process("simulator", upstream, log_dir))
        self.sim = f"http://127.0.0.1:{self.sim_port}/v1"
        self.redis = redis.Redis(port=self.redis_port)
        self.peer_redis = redis.Redis(port=self.peer_redis_port)
        wait_for(self.redis.ping, 10, "redis")
        wait_for(self.peer_redis.ping, 10, "peer redis")
        wait_for(lambda: requests.get(f"http://127.0.0.1:{self.sim_port}/healthz").ok, 10, "sim")
        self.stack = Stack(f"redis://127.0.0.1:{self.redis_port}/0", self.sim, log_dir)
        self.stack.env = {
            "RELAY_UPSTREAM_READ_TIMEOUT": "60",
            "RELAY_LEASE_SECONDS": "10",
            "RELAY_KEEPALIVE_SECONDS": "15",
            "RELAY_UPSTREAM_INCLUDE_USAGE": "false",
            # Thousands of viewers from one load generator's address and one read token.
            "RELAY_MAX_STREAMS_PER_CLIENT": "0",
            "RELAY_MAX_STREAMS_PER_TOKEN": "0",
        }

    def stop(self) -> None:
        self.stack.stop()
        for proc in reversed(self.procs):
            proc.stop()

    # -- helpers --------------------------------------------------------------------------------

    def relay(self, processes: int = 1) -> list[str]:
        """Fresh single-process gunicorns (so viewers can be split evenly): their base URLs."""
        return [self.stack.start_web(workers=1) for _ in range(processes)]

    def stop_relays(self) -> None:
        """Stop every gunicorn of the stack (workers stay)."""
        for proc in [p for p in self.stack.procs if p.name.startswith("gunicorn")]:
            proc.stop()
            self.stack.procs.remove(proc)

    def create_job(self, base: str, body: dict) -> dict:
        response = requests.post(f"{base}/v1/jobs", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def log_length(self, job_id: str) -> int:
        from relay.core import keys

        return int(self.redis.llen(keys.events(job_id)))

    def cpu_meter(self) -> CpuMeter:
        """A meter over every running part: Redis, the simulator, workers, gunicorn workers."""
        parts: dict[str, list[int]] = {"simulator": [], "redis": [], "worker": [], "web": []}
        for proc in self.procs + self.stack.procs:
            if not proc.alive():
                continue
            if proc.name == "redis" or proc.name == "simulator":
                parts[proc.name].append(proc.popen.pid)
            elif proc.name.startswith("gunicorn"):
                parts["web"] += children(proc.popen.pid)
            elif proc.name.startswith("test-worker"):
                parts["worker"].append(proc.popen.pid)
        return CpuMeter(parts, self.profile)

    def relay_connections(self) -> int:
        return int(self.redis.info("clients")["connected_clients"]) - 1  # not this probe

    # -- scenarios ------------------------------------------------------------------------------

    def viewers(self, urls: list[str], **kwargs) -> Viewers:
        return Viewers(urls, self.log_dir, clients=self.clients, nice=self.nice, **kwargs)

    def floor(self, tokens: int) -> Row:
        """The simulator read directly by one viewer: what any relay adds to is this."""
        body = json.dumps(sim_body(tokens, stream=True, first_delay=0.5)).encode()
        group = self.viewers([f"{self.sim}/chat/completions"], method="POST", body=body)
        since = group.wait_ready()
        seen = group.seen(tokens * INTERVAL + 30)
        complete = sum(1 for n in seen.events if n >= tokens + 2)
        return latency_row("fan-out", "floor", "1 viewer, direct", 1, seen.latencies(since),
                           f"{complete}/1 complete", errors=seen.errors)  # fmt: skip

    def relay_fanout(self, bases: list[str], viewers: int, tokens: int) -> Row:
        """One job, ``viewers`` viewers split evenly over the gunicorns at ``bases``."""
        lead = connect_lead(viewers)
        chunks_from = time.monotonic() + lead
        job = self.create_job(bases[0], sim_body(tokens, first_delay=lead))
        urls = [on(bases[i % len(bases)], job["events_url"]) for i in range(viewers)]
        started = time.monotonic()
        group = self.viewers(urls)
        since = group.wait_ready()
        connected_in = time.monotonic() - started
        connections = self.relay_connections()
        meter = self.cpu_meter()
        meter.start(chunks_from)
        seen = group.seen(lead + tokens * INTERVAL + 60)
        cpu = meter.stop(seen.cpu_seconds)
        expected = self.log_length(job["id"])
        complete = sum(1 for n in seen.events if n == expected)
        spread = summarise(seen.spreads(since)).p50 * 1e3
        load = f"{viewers:,} viewers, {len(bases)} process{'es' if len(bases) > 1 else ''}"
        return latency_row(
            "fan-out", "relay", load, viewers, seen.latencies(since),
            f"{complete:,}/{viewers:,} got all {expected} events; first to last viewer "
            f"{spread:.1f} ms (p50); Redis connections: {connections} (web + worker)",
            connections=connections, complete=complete, errors=seen.errors[:5],
            connected_in=round(connected_in, 2), cpu=cpu, spread_p50_ms=spread,
        )  # fmt: skip

    def kernel_fanout(self, viewers: int) -> Row:
        """One thread sending one event to ``viewers`` sockets: the fan-out loop's floor."""
        run = subprocess.run(
            [sys.executable, "-m", "tests.bench.sendloop", "--viewers", str(viewers),
             "--rounds", "20" if self.smoke else "200"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        r = json.loads(run.stdout)
        return Row(
            "fan-out", "kernel", f"{viewers:,} sockets, 1 thread, no relay", viewers,
            p50_ms=r["loop_p50_ms"], p99_ms=r["loop_p99_ms"],
            result=f"one send() per socket: {r['send_us']:.1f} us each; the times are the "
            "whole loop's (first to last socket)",
            extra=r,
        )  # fmt: skip

    def peer_fanout(self, viewers: int, tokens: int) -> Row:
        """The same viewers and chunks through flask-sse (one gunicorn -k gevent process)."""
        port = free_port()
        url = f"redis://127.0.0.1:{self.peer_redis_port}/0"
        peer = start_process(f"flask-sse-{viewers}", [
            sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
            "--worker-connections", "10000", "--keep-alive", "75", "-b", f"127.0.0.1:{port}",
            "--log-level", "warning", "tests.bench.peer_flask_sse:app",
        ], self.log_dir, {"PEER_REDIS_URL": url})  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: requests.get(f"{base}/", timeout=1).status_code == 404, 20, "peer")
            channel = f"bench-{viewers}-{time.time_ns()}"
            group = self.viewers([f"{base}/stream?channel={channel}"] * viewers, ready_on="sent")
            group.wait_ready()

            def subscribed() -> bool:
                return self.peer_redis.pubsub_numsub(channel)[0][1] >= viewers

            # flask-sse sends its headers with the first event: count subscriptions instead.
            wait_for(subscribed, connect_lead(viewers) + 60, "flask-sse viewers")
            connections = int(self.peer_redis.info("clients")["connected_clients"]) - 1
            since = time.time()
            publisher = subprocess.run(
                [sys.executable, "-m", "tests.bench.peer_flask_sse", "publish", url,
                 self.sim, channel, str(tokens), str(INTERVAL)],
                cwd=ROOT, capture_output=True, text=True, timeout=tokens * INTERVAL + 60,
            )  # fmt: skip
            if publisher.returncode:
                raise RuntimeError(f"publisher failed: {publisher.stderr[-2000:]}")
            published = json.loads(publisher.stdout)["published"]
            seen = group.seen(60)
            complete = sum(1 for n in seen.events if n == published)
            return latency_row(
                "fan-out", "flask-sse", f"{viewers:,} viewers, 1 process", viewers,
                seen.latencies(since),
                f"{complete:,}/{viewers:,} got all {published} events; Redis connections: "
                f"{connections} (web)",
                connections=connections, complete=complete, errors=seen.errors[:5],
            )  # fmt: skip
        finally:
            peer.stop()

    def many_jobs(self, bases: list[str], jobs: int, per_job: int, tokens: int) -> Row:
        """``jobs`` concurrent jobs with ``per_job`` viewers each: delivered events/s, latency."""
        lead = 3.0 + jobs / 200
        chunks_from = time.monotonic() + lead
        pool = Pool(50)
        made = pool.map(lambda i: self.create_job(bases[i % len(bases)],
                                                  sim_body(tokens, first_delay=lead)),
                        range(jobs))  # fmt: skip
        urls = [on(bases[(i + k) % len(bases)], job["events_url"])
                for i, job in enumerate(made) for k in range(per_job)]  # fmt: skip
        group = self.viewers(urls)
        since = group.wait_ready()
        meter = self.cpu_meter()
        meter.start(chunks_from)
        seen = group.seen(lead + tokens * INTERVAL * 3 + 60)
        cpu = meter.stop(seen.cpu_seconds)
        lengths = {job["id"]: self.log_length(job["id"]) for job in made}
        complete = sum(1 for n in seen.events if n in set(lengths.values()))
        rate = seen.rate(since)
        # A worker that falls behind merges text deltas (worker/publisher.py): fewer events,
        # the same text. Every upstream chunk of a complete viewer's job reached it, merged or
        # not: the stamped chunks (role, tokens, finish) per job, over the same window.
        stamped = [r for e, r in zip(seen.emitted, seen.received, strict=True) if e >= since]
        window = max(stamped) - min(stamped) if len(stamped) > 1 else 0.0
        chunk_rate = complete * (tokens + 2) / window if window else 0.0
        merged = 1 - sum(lengths.values()) / (len(made) * (tokens + 3))  # + [DONE]
        return latency_row(
            "many jobs", "relay",
            f"{jobs} jobs x {per_job} viewers, {len(bases)} processes, {1 / INTERVAL:.0f} "
            "chunks/s each", len(urls), seen.latencies(since),
            f"{rate:,.0f} delivered events/s ({chunk_rate:,.0f} upstream chunks/s, "
            f"{merged:.0%} of them merged); {complete:,}/{len(urls):,} viewers got every event",
            rate=rate, chunk_rate=chunk_rate, merged=merged, complete=complete,
            errors=seen.errors[:5], cpu=cpu,
        )  # fmt: skip

    def idle_viewers(self, viewers: int) -> Row:
        """RSS growth of one gunicorn process per idle viewer (a job that has not spoken yet)."""
        base = self.relay(1)[0]
        pid = children(self.stack.procs[-1].popen.pid)[0]
        job = self.create_job(base, sim_body(1, first_delay=600))
        url = on(base, job["events_url"])
        warm = self.viewers([url] * 20)  # lazily imported code and pools are not per viewer
        warm.wait_ready()
        gevent.sleep(1)
        before = rss_kib(pid)
        group = self.viewers([url] * viewers)
        group.wait_ready()
        gevent.sleep(2)  # let the process settle; nothing else runs
        after = rss_kib(pid)
        per_viewer = (after - before) * 1024 / viewers
        requests.post(on(base, job["cancel_url"]), timeout=10)
        seen = group.seen(30)
        warm.seen(30)
        self.stop_relays()
        return Row(
            "idle viewers", "relay", f"{viewers:,} idle viewers, 1 process", viewers,
            result=f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB: "
            f"{per_viewer / 1024:.1f} KiB per viewer ({len(seen.events) - len(seen.errors):,} "
            "ended cleanly on cancel)",
            extra={"per_viewer_kib": per_viewer / 1024},
        )  # fmt: skip

    def first_chunk(self, base: str, jobs: int, *, leave: bool = False) -> list[Row]:
        """Time from POST to the first chunk, through the relay and directly, interleaved.

        Each client reads its stream to the end, as a chat client does: the job completes and
        its upstream connection goes back to the worker's pool for the next job. With
        ``leave``, each client hangs up at the first chunk instead: the relay cancels the
        job, closing its upstream connection (that is how an upstream is told to stop), so
        every job opens a new one.
        """
        relay_times: list[float] = []
        direct_times: list[float] = []
        body = first_chunk_body()
        for _ in range(jobs):
            for url, into in ((f"{base}/v1/chat/completions", relay_times),
                              (f"{self.sim}/chat/completions", direct_times)):  # fmt: skip
                if (took := time_to_first_chunk(url, body, leave=leave)) is not None:
                    into.append(took)
        r, d = summarise(relay_times), summarise(direct_times)
        overhead = (
            f"overhead p50 {(r.p50 - d.p50) * 1e3:.1f} ms, p99 {(r.p99 - d.p99) * 1e3:.1f} ms"
        )
        scenario = "enqueue to first chunk" + (", client leaves at it" if leave else "")
        how = "each job cancelled by its client at the first chunk" if leave else "read to [DONE]"
        return [
            latency_row(scenario, "relay", f"{jobs:,} jobs, one at a time", 0,
                        relay_times, f"POST to first chunk ({how}); {overhead}",
                        overhead_p50_ms=(r.p50 - d.p50) * 1e3,
                        overhead_p99_ms=(r.p99 - d.p99) * 1e3),
            latency_row(scenario, "floor", f"{jobs:,} requests, direct", 0,
                        direct_times, "the simulator's own time to first chunk"),
        ]  # fmt: skip

    def worker_capacity(self, base: str, streams: int, tokens: int) -> Row:
        """``streams`` jobs at once on one worker process: how far behind the upstream it ends.

        Nothing subscribes (a subscriber in this process cost 0.4 of a core): each job's lag is
        its ``finished_at`` (written by the worker after its last publish) minus the emit time
        of its last chunk, read from the replay log afterwards. A worker that keeps up ends
        every job within milliseconds of the upstream; one that does not falls further behind
        with every chunk.
        """
        from relay.core import keys

        lead = 2.0 + streams / 200
        pool = Pool(50)
        made = pool.map(lambda i: self.create_job(base, sim_body(tokens, first_delay=lead)),
                        range(streams))  # fmt: skip
        ids = [job["id"] for job in made]

        def ended() -> bool:
            statuses = self.redis.pipeline()
            for job_id in ids:
                statuses.hget(keys.job(job_id), "status")
            return all(s in (b"completed", b"failed") for s in statuses.execute())

        wait_for(ended, lead + tokens * INTERVAL * 5 + 60, "the jobs to end", interval=0.5)
        lags, first, last, events, ok = [], [], [], 0, 0
        for job_id in ids:
            log = self.redis.lrange(keys.events(job_id), 0, -1)
            stamps = [float(m.group(1)) for m in map(STAMP.search, log) if m]
            status, finished = self.redis.hmget(keys.job(job_id), "status", "finished_at")
            ok += status == b"completed"
            events += len(log)
            lags.append(float(finished) - stamps[-1])
            first.append(stamps[0])
            last.append(float(finished))
        rate = events / (max(last) - min(first))
        return latency_row(
            "worker capacity", "relay",
            f"{streams} concurrent upstream streams, 1 worker process", 0, lags,
            f"{ok}/{streams} jobs completed; {rate:,.0f} chunks/s published "
            f"(offered {streams / INTERVAL:,.0f}); latency: last chunk's emit to the job's end",
            rate=rate, done=ok,
        )  # fmt: skip


def print_table(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| scenario | system | load | p50 ms | p99 ms | max ms | result |",
             "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny loads, for CI")
    parser.add_argument("--out", type=Path, help="where results.json goes (default: alongside)")
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--client-nice", type=int, default=0, help="the load generators' nice")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the worker and web processes of "
        "each measured scenario into this folder (raw files, summarised)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    out = args.out or (Path(tempfile.mkdtemp(prefix="relay-bench-smoke-")) if smoke
                       else Path(__file__).resolve().parent)  # fmt: skip
    log_dir = Path(tempfile.mkdtemp(prefix="relay-bench-logs-"))
    tokens = 20 if smoke else 150
    counts = [1, 5] if smoke else [1, 100, 1000, 2000]
    wanted = set(args.only or ["fanout", "peer", "many", "idle", "first", "worker"])
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    bench = Bench(smoke, log_dir, args.clients, args.client_nice, args.profile)
    rows = bench.rows
    header = f"machine: {machine()}"
    print(header, f"\nlogs: {log_dir}\n", flush=True)
    try:
        bench.stack.start_worker(concurrency=1024, env={"RELAY_WORKER_CONCURRENCY": "1024"})
        if "fanout" in wanted:
            rows.append(bench.floor(tokens))
            print(rows[-1].cells(), flush=True)
            bases = bench.relay(2)
            for n in counts:
                rows.append(bench.relay_fanout(bases[:1], n, tokens))
                print(rows[-1].cells(), flush=True)
            rows.append(bench.kernel_fanout(5 if smoke else 1000))
            print(rows[-1].cells(), flush=True)
            rows.append(bench.relay_fanout(bases, 10 if smoke else 4000, tokens))
            print(rows[-1].cells(), flush=True)
            bench.stop_relays()
        if "peer" in wanted:
            for n in counts:
                rows.append(bench.peer_fanout(n, tokens))
                print(rows[-1].cells(), flush=True)
        if "many" in wanted:
            bases = bench.relay(2)
            for jobs in [5] if smoke else [150, 200, 250, 500]:
                rows.append(bench.many_jobs(bases, jobs, 2, 50 if smoke else 250))
                print(rows[-1].cells(), flush=True)
            bench.stop_relays()
        if "idle" in wanted:
            rows.append(bench.idle_viewers(20 if smoke else 2000))
            print(rows[-1].cells(), flush=True)
        if "first" in wanted:
            base = bench.relay(1)[0]
            rows += bench.first_chunk(base, 10 if smoke else 1000)
            rows += bench.first_chunk(base, 10 if smoke else 1000, leave=True)
            print(rows[-1].cells(), flush=True)
            bench.stop_relays()
        if "worker" in wanted:
            base = bench.relay(1)[0]
            for streams in [5] if smoke else [100, 200, 400]:
                rows.append(bench.worker_capacity(base, streams, 20 if smoke else 250))
                print(rows[-1].cells(), flush=True)
            bench.stop_relays()
    finally:
        bench.stop()
    print()
    print_table(rows, header)
    command = "bash tests/bench/run.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    results = out / "results.json"
    results.write_text(json.dumps({"machine": machine(), "command": command.strip(),
                                   "rows": [asdict(r) for r in rows]}, indent=1))  # fmt: skip
    print(f"\nwrote {results}")
    try:
        from tests.bench import report

        print(f"wrote {report.write(results, out)}")
    except ImportError as exc:  # the plot needs the bench extra (matplotlib)
        print(f"no report: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
