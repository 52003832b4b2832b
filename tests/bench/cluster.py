"""The many-jobs scenario on one Redis and on a Redis Cluster (three masters, three replicas), in
one run: delivered events/s and latency, the cores each part used, each node's share of the
commands (``INFO commandstats``) and the Redis connections each web process holds.

    bash tests/bench/run.sh --cluster            # prints the tables; RESULTS.md quotes them
    bash tests/bench/run.sh --cluster --smoke    # tiny loads, to see that it runs
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import redis  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.run import Bench, CpuMeter, Row, children, machine, print_table  # noqa: E402
from tests.cluster import Cluster, start_cluster  # noqa: E402
from tests.conftest import Stack  # noqa: E402


class ClusterBench(Bench):
    """Bench whose relay runs on a cluster: the nodes count as its Redis."""

    cluster: Cluster | None = None

    def use_cluster(self, cluster: Cluster) -> None:
        env = self.stack.env
        self.stack.stop()
        self.cluster = cluster
        self.stack = Stack(cluster.url, self.sim, self.log_dir, env, cluster=True)
        self.redis = cluster.client()  # type: ignore[assignment]

    def cpu_meter(self) -> CpuMeter:
        meter = super().cpu_meter()
        if self.cluster is not None:  # every node, masters and replicas, is the relay's Redis
            meter.parts["redis"] = [node.proc.pid for node in self.cluster.nodes]
        return meter

    def node_ports(self) -> list[int]:
        if self.cluster is None:
            return [self.redis_port]
        return [node.port for node in self.cluster.nodes]

    def master_ports(self) -> list[int]:
        """The nodes clients send commands to (a replica runs its master's writes too)."""
        if self.cluster is None:
            return [self.redis_port]
        return [node.port for node in self.cluster.masters()]


def calls(port: int) -> int:
    """Commands a node has run since it started (``INFO commandstats``)."""
    stats = redis.Redis(port=port).info("commandstats")
    return sum(int(entry["calls"]) for entry in stats.values())


def redis_connections(pid: int, ports: set[int]) -> int:
    """TCP connections process ``pid`` holds to any of ``ports`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[9] in inodes and remote_port in ports and fields[3] == "01":
                count += 1
    return count


def run_topology(bench: ClusterBench, name: str, loads: list[int], tokens: int) -> list[Row]:
    """The many-jobs rows on the current topology, with its per-node and per-process figures."""
    bench.stack.start_worker(concurrency=1024, env={"RELAY_WORKER_CONCURRENCY": "1024"})
    bases = bench.relay(2)
    rows = []
    for jobs in loads:
        masters = bench.master_ports()
        before = {port: calls(port) for port in masters}
        row = bench.many_jobs(bases, jobs, 2, tokens)
        done = {port: calls(port) - before[port] for port in masters}
        total = sum(done.values()) or 1
        row.system = f"relay, {name}"
        row.extra["commands_per_node"] = {str(p): done[p] for p in masters}
        row.extra["share_per_node"] = {str(p): round(done[p] / total, 3) for p in masters}
        webs = [pid for proc in bench.stack.procs if proc.name.startswith("gunicorn")
                for pid in children(proc.popen.pid)]  # fmt: skip
        row.extra["redis_connections_per_web"] = [
            redis_connections(pid, set(bench.node_ports())) for pid in webs
        ]
        print(row.cells(), json.dumps({k: row.extra[k] for k in
              ("share_per_node", "redis_connections_per_web", "cpu")}), flush=True)  # fmt: skip
        rows.append(row)
    bench.stack.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny loads")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--jobs", type=int, nargs="*", help="concurrent jobs per row")
    parser.add_argument("--out", type=Path, help="where cluster.json goes (default: the log dir)")
    args = parser.parse_args(argv)
    loads = args.jobs or ([5] if args.smoke else [200, 500])
    tokens = 50 if args.smoke else 250
    log_dir = Path(tempfile.mkdtemp(prefix="relay-bench-cluster-"))
    bench = ClusterBench(args.smoke, log_dir, args.clients)
    rows: list[Row] = []
    cluster = None
    try:
        rows += run_topology(bench, "one Redis", loads, tokens)
        cluster = start_cluster(log_dir / "cluster")
        bench.use_cluster(cluster)
        rows += run_topology(bench, "3 masters + 3 replicas", loads, tokens)
    finally:
        bench.stop()
        if cluster is not None:
            cluster.stop()
    header = f"machine: {machine()}"
    print()
    print_table(rows, header)
    print("\n| topology | jobs | cores: worker / redis / web / total | commands per master "
          "(share) | Redis connections per web process |\n|---|---:|---|---|---|")  # fmt: skip
    for row in rows:
        cpu = row.extra.get("cpu", {})
        shares = ", ".join(f"{share:.0%}" for share in row.extra["share_per_node"].values())
        print(f"| {row.system} | {row.load.split(' ')[0]} | {cpu.get('worker')} / "
              f"{cpu.get('redis')} / {cpu.get('web')} / {sum(cpu.values()):.2f} | {shares} | "
              f"{row.extra['redis_connections_per_web']} |")  # fmt: skip
    out = args.out or log_dir
    (out / "cluster.json").write_text(
        json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(f"\nwrote {out / 'cluster.json'}; logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
