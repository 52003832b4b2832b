"""The first chunk, before and after a change, measured side by side:
``python -m tests.bench.first_ab --base REV [--jobs 600] [--rounds 4] [--key]
[--base-python PYTHON]``.

This machine's speed drifts by more than a change is worth between two runs minutes apart
(RESULTS.md, "First chunk"), so comparing one run of the old code with a later run of the new
one says little. Here both run at once: two complete stacks (each its own Redis, upstream,
gunicorn process and worker), one from the working tree and one from a checkout of ``REV`` (a
git worktree made for the run and removed after it), and the jobs alternate between them:
a job on one stack, the same request sent to its upstream directly, then the same on the
other, which goes first in the next job. Each job is read to ``[DONE]``, as chat clients do,
and timed to its first chunk. The stack started second measures about 0.1 ms faster whatever
code it runs (RESULTS.md, "The stack started second"), so the one started first swaps every
round: compare an even number of rounds. With ``--key``, each relay requires an API key, as a
production one does (a key is made in each stack's Redis before its relay starts, and every
request carries it). With ``--base-python``, the base's gunicorn and worker run on another
interpreter (``--base HEAD``: the same code on two interpreters).

Prints, per stack, p50 and p90 of POST to first chunk, of the upstream's own time (the floor)
and of the difference (the overhead), and the CPU each part of the stack used per job.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tests.conftest as conftest  # noqa: E402
from relay.core import apikeys  # noqa: E402
from tests.bench.run import (  # noqa: E402
    Bench,
    children,
    cpu_seconds,
    first_chunk_body,
    time_to_first_chunk,
)

WARMUP = 50  # jobs per stack before the measured ones: pools and subscriptions open


def first_chunk(url: str, body: bytes, headers: dict[str, str] | None = None) -> float:
    took = time_to_first_chunk(url, body, headers=headers)
    if took is None:
        raise ConnectionError(f"{url} closed before its first chunk")
    return took


def start(tree: Path, key: bool, python: str = sys.executable) -> tuple[Bench, str, dict[str, str]]:
    """A stack whose processes run the code in ``tree``: its Bench, its relay's base URL and
    the headers its requests carry (an API key's, with ``key``). ``python`` runs its gunicorn
    and worker (its Redis, its upstream and the client stay on this interpreter)."""
    conftest.ROOT, conftest.GUNICORN_CONF = tree, tree / "deploy" / "gunicorn.conf.py"
    conftest.PYTHON = python
    bench = Bench(False, Path(tempfile.mkdtemp(prefix=f"first-ab-{tree.name}-")))
    headers = {}
    if key:  # before the relay starts: it then requires keys from its first request
        headers["Authorization"] = f"Bearer {apikeys.create(bench.redis, 'first-ab')}"
    bench.stack.start_worker(concurrency=1024, env={"RELAY_WORKER_CONCURRENCY": "1024"})
    return bench, bench.relay(1)[0], headers


def parts(bench: Bench) -> dict[str, int]:
    """The pid of each part of a stack."""
    pids: dict[str, int] = {}
    for proc in bench.procs + bench.stack.procs:
        if proc.name.startswith("gunicorn"):
            pids["web"] = children(proc.popen.pid)[0]
        elif proc.name.startswith("test-worker"):
            pids["worker"] = proc.popen.pid
        elif proc.name in ("redis", "simulator"):
            pids["redis" if proc.name == "redis" else "upstream"] = proc.popen.pid
    return pids


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def measure(
    trees: list[Path],
    jobs: int,
    warmup: int = WARMUP,
    key: bool = False,
    pythons: dict[Path, str] | None = None,
) -> None:
    stacks = []
    try:
        for tree in trees:
            stacks.append((tree, *start(tree, key, (pythons or {}).get(tree, sys.executable))))
        body = first_chunk_body()
        relay: dict[Path, list[float]] = {tree: [] for tree in trees}
        floor: dict[Path, list[float]] = {tree: [] for tree in trees}
        cpu_before: dict[Path, dict[str, float]] = {}
        for n in range(warmup + jobs):
            if n == warmup:
                cpu_before = {t: {k: cpu_seconds(p) for k, p in parts(b).items()}
                              for t, b, _, _ in stacks}  # fmt: skip
            # Each stack goes first in every other job, so that neither always follows the
            # other's direct request (the stack started second is faster still: see main).
            for tree, bench, base, headers in stacks if n % 2 else stacks[::-1]:
                took = first_chunk(f"{base}/v1/chat/completions", body, headers)
                direct = first_chunk(f"{bench.sim}/chat/completions", body)
                if n >= warmup:
                    relay[tree].append(took)
                    floor[tree].append(direct)
        for tree, bench, _, _ in stacks:
            cpu = {k: (cpu_seconds(p) - cpu_before[tree][k]) / jobs * 1e3
                   for k, p in parts(bench).items()}  # fmt: skip
            r, f = relay[tree], floor[tree]
            print(
                f"{tree}: POST to first chunk p50 {quantile(r, 0.5) * 1e3:.2f} ms, "
                f"p90 {quantile(r, 0.9) * 1e3:.2f} ms | upstream alone p50 "
                f"{quantile(f, 0.5) * 1e3:.2f} ms | overhead p50 "
                f"{(quantile(r, 0.5) - quantile(f, 0.5)) * 1e3:.2f} ms, p90 "
                f"{(quantile(r, 0.9) - quantile(f, 0.9)) * 1e3:.2f} ms | CPU ms per job: "
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items())),
                flush=True,
            )
    finally:
        for _, bench, _, _ in stacks:
            bench.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--jobs", type=int, default=600, help="measured jobs per stack and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="unmeasured jobs first")
    parser.add_argument("--key", action="store_true", help="relays that require an API key")
    parser.add_argument("--base-python", default=sys.executable,
                        help="the interpreter of the base's gunicorn and worker (a virtualenv's "
                        "python with the project's dependencies): with --base HEAD, two "
                        "interpreters compared")  # fmt: skip
    args = parser.parse_args(argv)
    checkout = Path(tempfile.mkdtemp(prefix="first-ab-base-")) / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(checkout),
                    args.base], check=True)  # fmt: skip
    try:
        for round_ in range(1, args.rounds + 1):
            # The stack started first swaps every round: the one started second is faster.
            trees = [checkout, ROOT] if round_ % 2 else [ROOT, checkout]
            first = "base" if round_ % 2 else "working tree"
            print(f"round {round_}: {args.base} (base) and the working tree, {first} started first",
                  flush=True)  # fmt: skip
            measure(trees, args.jobs, args.warmup, args.key, {checkout: args.base_python})
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)],
                       check=False)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
