"""A real Redis Cluster for the tests: three masters and three replicas from ``redis-server`` on
free ports, joined by ``redis-cli --cluster create``; always stopped by the fixture that starts
it (tests/conftest.py, ``redis_cluster``).

A node's cluster bus listens on its port + 10000, so both must be free and the port at most
55535 (a random free ephemeral port often is not: the node then exits at start).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster

NODE_TIMEOUT_MS = 1500  # how long a master may be silent before its replica takes over


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` ports whose bus ports (+10000) are free too, all below 55536."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 55535)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


@dataclass
class Node:
    port: int
    proc: subprocess.Popen
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Start a killed node again: its nodes.conf makes it rejoin (as a replica, if it was
        failed over)."""
        if not self.alive():
            self.proc = _spawn(self.argv)
            _wait_ping(self)


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed: any one node that runs."""
        return f"redis://{next(n for n in self.nodes if n.alive()).address}/0"

    def client(self) -> RedisCluster:
        alive = next(n for n in self.nodes if n.alive())
        return RedisCluster(host="127.0.0.1", port=alive.port, socket_timeout=5)

    def masters(self) -> list[Node]:
        """The nodes that are masters now (a failover changes which)."""
        found = []
        for node in self.nodes:
            if node.alive():
                try:
                    if node.client().info("replication")["role"] == "master":
                        found.append(node)
                except redis.RedisError:
                    pass
        return found

    def master_of(self, key: str) -> Node:
        """The node serving ``key``'s slot now."""
        slot = self.client().keyslot(key)
        alive = next(n for n in self.nodes if n.alive())
        for start, end, primary, *_ in alive.client().execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(f"no master serves slot {slot} of {key}")

    def flush(self) -> None:
        for node in self.masters():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def wait_healthy(self, timeout: float = 30.0, replicated: bool = False) -> None:
        """Until every node that runs says the cluster is ok and all slots are served; with
        ``replicated``, also until every replica that runs has synced with its master (one that
        never has cannot take over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                running = [n for n in self.nodes if n.alive()]
                states = [n.client().cluster("info")["cluster_state"] for n in running]
                infos = [n.client().info("replication") for n in running] if replicated else []
                synced = all(
                    info["role"] == "master" or info.get("master_link_status") == "up"
                    for info in infos
                )
                if states and all(state == "ok" for state in states) and synced:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the cluster did not become healthy")


def start_cluster(directory: Path, masters: int = 3, replicas: int = 1) -> Cluster:
    """Start and join the nodes; the caller must ``stop()`` the result."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run the tests with deploy/test.sh")
    cluster = Cluster()
    try:
        for port in cluster_ports(masters * (1 + replicas)):
            home = directory / f"node-{port}"
            home.mkdir(parents=True)
            log = home / "redis.log"
            # A replica syncs at once (the default waits 5 s for more replicas to batch).
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", str(home / "nodes.conf"),
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "",
                    "--appendonly", "no", "--repl-diskless-sync-delay", "0",
                    "--cluster-require-full-coverage", "no",
                    "--dir", str(home), "--logfile", str(log)]  # fmt: skip
            cluster.nodes.append(Node(port, _spawn(argv), log, argv))
        for node in cluster.nodes:
            _wait_ping(node)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in cluster.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        cluster.wait_healthy(replicated=True)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _wait_ping(node: Node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if node.client().ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server on {node.port} did not start ({node.log})")
