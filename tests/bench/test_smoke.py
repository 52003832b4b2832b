"""CI's smoke run of the benchmark suite: every scenario end to end at tiny loads.

The numbers are not checked (CI machines vary and share cores); that every scenario runs, every
viewer gets every event, and the report's rows are all there, is.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_the_benchmark_suite_runs_at_tiny_loads(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--smoke", "--clients", "2", "--out",
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    seen = {(r["scenario"], r["system"]) for r in rows}
    assert seen == {
        ("fan-out", "floor"), ("fan-out", "relay"), ("fan-out", "flask-sse"), ("fan-out", "kernel"),
        ("many jobs", "relay"), ("idle viewers", "relay"),
        ("enqueue to first chunk", "relay"), ("enqueue to first chunk", "floor"),
        ("enqueue to first chunk, client leaves at it", "relay"),
        ("enqueue to first chunk, client leaves at it", "floor"),
        ("worker capacity", "relay"),
    }  # fmt: skip
    for row in rows:
        if row["scenario"] in ("fan-out", "many jobs") and row["system"] != "kernel":
            assert row["extra"].get("complete", 1) == row["viewers"], row
            assert row["samples"] > 0, row
            assert not row["extra"].get("errors"), row
    workers = [r for r in rows if r["scenario"] == "worker capacity"]
    assert all(r["extra"]["done"] == 5 for r in workers), workers


@pytest.mark.timeout(120)
def test_the_side_by_side_first_chunk_benchmark_runs(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.first_ab", "--base", "HEAD", "--jobs", "5",
         "--warmup", "2", "--rounds", "2", "--key"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "overhead p50" in line]
    # The stack started first swaps between rounds (the one started second is faster).
    assert len(lines) == 4 and "/base:" in lines[0] and "/base:" in lines[3], run.stdout
    assert "worker" in lines[1] and "web" in lines[1]  # the CPU each part used
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                               text=True).stdout  # fmt: skip
    assert "first-ab-base" not in worktrees  # the checkout is removed after the run


@pytest.mark.timeout(120)
def test_the_floor_chain_benchmark_runs():
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.floor_chain", "--jobs", "5", "--warmup", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split(":")[0] for line in run.stdout.splitlines() if "overhead p50" in line]
    assert rows == ["relay", "floor chain, gunicorn + Flask", "floor chain"], run.stdout
    assert "upstream alone: p50" in run.stdout


@pytest.mark.timeout(120)
def test_the_floor_chain_benchmark_measures_blocks_until_its_minutes_are_up():
    # Six milliseconds: the first block outlasts them, so there is exactly one, then the pool.
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.floor_chain", "--jobs", "3", "--warmup", "1",
         "--minutes", "0.0001"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    block = [line.split("] ")[1] for line in lines if line.startswith("[block 1, ")]
    assert [line.split(":")[0] for line in block] == [
        "upstream alone", "relay", "floor chain, gunicorn + Flask", "floor chain"
    ], run.stdout  # fmt: skip
    pooled = lines[lines.index("all 1 blocks, 3 jobs of each:") + 1 :]
    assert [line.split(":")[0] for line in pooled if "overhead p50" in line] == [
        "relay", "floor chain, gunicorn + Flask", "floor chain"
    ], run.stdout  # fmt: skip


def test_the_trace_gives_each_gap_job_by_job(capsys):
    """Two modes of one step show in its gap's quartiles; the difference of medians hides them."""
    from tests.bench.trace import print_steps

    fast = {"web -> redis: EVAL #1": 1.0, "upstream -> worker: data #1": 1.2}
    slow = {"web -> redis: EVAL #1": 1.1, "upstream -> worker: data #1": 1.9}
    print_steps([fast] * 40 + [slow] * 60)
    (line,) = [row for row in capsys.readouterr().out.splitlines() if "data #1" in row]
    assert "(+ 0.800 |  0.200  0.800  0.800)" in line, line


def test_redis_time_names_each_script_it_ran():
    """Scripts are named by their SHA1 or, sent whole, by the start the slow log keeps of them."""
    from relay.core.scripts import CLAIM, CREATE
    from tests.bench.redis_time import known_scripts, summarise

    scripts = known_scripts()
    claim_sha = next(sha for sha, (_, text) in scripts.items() if text == CLAIM.encode())
    create_head = CREATE.encode()[:128] + b"... (175 more bytes)"
    entries = [
        {"duration": 30, "args": [b"EVALSHA", claim_sha.encode(), b"1", b"relay:{job_x}:job"]},
        {"duration": 20, "args": [b"EVAL", create_head, b"3"]},
        {"duration": 22, "args": [b"EVAL", create_head, b"3"]},
        {"duration": 2, "args": [b"lpush", b"relay:pending", b"x"]},
        {"duration": 9, "args": [b"EVALSHA", b"0" * 40, b"0"]},
        {"duration": 3, "args": [b"HGET", b"relay:{job_x}:job", b"status"], "nested": True},
    ]
    lines = summarise(entries, 2, scripts)
    rows = {line[:34].strip(): line[34:].split() for line in lines[1:-1]}
    assert rows == {
        "EVAL scripts.CREATE": ["1.00", "21.0", "21.0"],
        "EVALSHA scripts.CLAIM": ["0.50", "30.0", "15.0"],
        "EVALSHA ?": ["0.50", "9.0", "4.5"],
        "LPUSH": ["0.50", "2.0", "1.0"],
    }, lines
    assert lines[-1] == (
        "all commands: 41.5 us per job, 40.5 of it in scripts, of which 1.5 in the 0.5 "
        "commands they ran"
    ), lines


@pytest.mark.timeout(120)
def test_the_redis_time_benchmark_runs():
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.redis_time", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    named = {line[:34].strip() for line in run.stdout.splitlines()}
    # The first chunk's path: the job stored, claimed, its first event published.
    assert {"EVAL scripts.CREATE", "EVALSHA scripts.CLAIM", "EVALSHA scripts.PUBLISH"} <= named
    assert "all commands:" in run.stdout
