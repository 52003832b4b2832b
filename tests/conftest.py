"""Shared fixtures: real processes (redis-server, the simulator, gunicorn, workers) on free
ports, each started, awaited by polling, and always stopped (the whole process group)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests
from redis.cluster import RedisCluster

from tests.cluster import Cluster, start_cluster

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
# What runs the relay's own processes (gunicorn, workers): tests.bench.first_ab points it at
# another interpreter to compare two.
PYTHON = sys.executable


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-url", default=None, help="use this Redis instead of starting one")


def free_port() -> int:
    """A free TCP port (``redis-server --port 0`` would disable TCP instead)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


@dataclass
class Proc:
    """A child process in its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0  # where this process's output starts in a log shared by name

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)

    def output(self) -> str:
        """What this process wrote (a later test's process of the same name appends)."""
        if not self.log.exists():
            return ""
        return self.log.read_bytes()[self.offset :].decode(errors="replace")


def start_process(
    name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None
) -> Proc:
    log = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    with open(log, "ab") as out:
        offset = out.tell()
        popen = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log, offset)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest, log_dir: Path) -> Iterator[str]:
    """A real redis-server for the session (its base URL, without a database number)."""
    given = request.config.getoption("--redis-url")
    if given:
        yield given.rstrip("/").rsplit("/", 1)[0] if given.count("/") > 2 else given
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run the tests with deploy/test.sh")
    port = free_port()
    proc = start_process(
        "redis-server",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "256",
        ],
        log_dir,
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        wait_for(lambda: redis.Redis.from_url(url).ping(), 10, "redis-server")
        yield url
    finally:
        proc.stop()


_databases = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A fresh, empty database of the session's server for one test."""
    db = next(_databases) % 256
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.close()


@pytest.fixture(scope="session")
def simulator(log_dir: Path) -> Iterator[str]:
    """The upstream simulator over real HTTP; its ``/v1`` base URL."""
    port = free_port()
    proc = start_process(
        "simulator",
        [sys.executable, "-m", "relay.dev.simulator", "--port", str(port), "--interval", "0.01"],
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{base}/healthz", timeout=1).ok, 15, "simulator")
        yield f"{base}/v1"
    finally:
        proc.stop()


@contextlib.contextmanager
def simulator_process(log_dir: Path, name: str, *args: str) -> Iterator[tuple[str, Proc]]:
    """A simulator process of one test's own, with server-wide options: (its base URL without
    /v1, the process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "relay.dev.simulator", "--port", str(port), *args]
    proc = start_process(name, cmd, log_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{base}/healthz", timeout=1).ok, 15, name)
        yield base, proc
    finally:
        proc.stop()


@dataclass
class Stack:
    """Relay processes against one Redis database; everything started is stopped at teardown."""

    redis_url: str
    upstream: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    cluster: bool = False  # redis_url names a node of a Redis Cluster
    _names: Iterator[int] = field(default_factory=itertools.count)

    def settings(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "RELAY_REDIS_URL": self.redis_url,
            "RELAY_REDIS_CLUSTER": "true" if self.cluster else "false",
            "RELAY_UPSTREAM_BASE_URL": self.upstream,
            "RELAY_LEASE_SECONDS": "3",
            "RELAY_UPSTREAM_READ_TIMEOUT": "3",
            "RELAY_UPSTREAM_MAX_RETRIES": "0",
            "RELAY_KEEPALIVE_SECONDS": "1",
            "RELAY_OPEN_ACCESS": "true",  # tests that need keys seed or create them
            # Every test's client is 127.0.0.1: guesses are throttled, and streams per client
            # capped, only where a test says so.
            "RELAY_AUTH_FAILURES_PER_MINUTE": "0",
            "RELAY_MAX_STREAMS_PER_CLIENT": "0",
            **self.env,
            **(extra or {}),
        }

    def redis(self) -> redis.Redis:
        if self.cluster:
            return RedisCluster.from_url(self.redis_url)  # type: ignore[return-value]
        return redis.Redis.from_url(self.redis_url)

    def start_web(
        self,
        workers: int = 1,
        env: dict[str, str] | None = None,
        graceful_timeout: float = 2,
        worker_connections: int = 10000,
    ) -> str:
        """A gunicorn -k gevent instance; its base URL once /healthz answers."""
        port = free_port()
        cmd = [
            PYTHON, "-m", "gunicorn",
            "-c", str(GUNICORN_CONF),  # the deployment's settings and hooks; flags override
            "-k", "gevent",
            "-w", str(workers),
            "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", str(graceful_timeout),
            "--worker-connections", str(worker_connections),
            "relay:create_app()",
        ]  # fmt: skip
        proc = start_process(f"gunicorn-{next(self._names)}", cmd, self.log_dir, self.settings(env))
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(f"{url}/healthz", timeout=1).ok, 20, f"gunicorn ({proc.log})")
        return url

    def start_worker(self, env: dict[str, str] | None = None, concurrency: int = 64) -> Proc:
        """A worker process; returns once it has registered in Redis."""
        worker_id = f"test-worker-{next(self._names)}"
        cmd = [
            PYTHON, "-m", "worker",
            "--worker-id", worker_id,
            "--concurrency", str(concurrency),
            "--grace", "2",
        ]  # fmt: skip
        proc = start_process(worker_id, cmd, self.log_dir, self.settings(env))
        self.procs.append(proc)
        client = self.redis()
        wait_for(
            lambda: client.exists(f"relay:{{worker:{worker_id}}}:heartbeat"),
            20,
            f"worker ({proc.log})",
        )
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def stack(redis_url: str, simulator: str, log_dir: Path) -> Iterator[Stack]:
    """An empty stack for one test: start the processes the test needs."""
    s = Stack(redis_url, simulator, log_dir)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real Redis Cluster (three masters, three replicas) for the session."""
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_stack(redis_cluster: Cluster, simulator: str, log_dir: Path) -> Iterator[Stack]:
    """An empty stack for one test, on the cluster (emptied first)."""
    redis_cluster.wait_healthy(30, replicated=True)
    redis_cluster.flush()
    # A worker's heartbeat may live on a failed master: its lease outlasts a failover (~3 s).
    s = Stack(redis_cluster.url, simulator, log_dir, {"RELAY_LEASE_SECONDS": "10"}, cluster=True)
    try:
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def relay_stack(
    redis_server: str, upstream: str, log_dir: Path, **env: str
) -> Iterator[tuple[Stack, str]]:
    """gunicorn and a worker on a fresh database, pointed at ``upstream``: (stack, base URL)."""
    url = f"{redis_server}/{next(_databases) % 256}"
    redis.Redis.from_url(url).flushdb()
    stack = Stack(url, upstream, log_dir, env=env)
    try:
        base = stack.start_web()
        stack.start_worker()
        yield stack, base
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def running_stack(redis_server: str, simulator: str, log_dir: Path) -> Iterator[tuple[Stack, str]]:
    """One gunicorn and one worker shared by a module's tests; (stack, base URL)."""
    with relay_stack(redis_server, simulator, log_dir) as started:
        yield started


@pytest.fixture(scope="module")
def base(running_stack: tuple[Stack, str]) -> str:
    """The base URL of the module's shared gunicorn."""
    return running_stack[1]
