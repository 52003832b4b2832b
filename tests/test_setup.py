"""The README's set-up, as a new user runs it: a fresh clone and ``bash deploy/run.sh``.

(``bash deploy/test.sh`` is what CI itself runs, so it is proven by every CI run.) The clone is
of the committed HEAD; the stack gets free ports and a Redis URL where nothing listens, so the
script must start its own redis-server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# A warning, an error or a traceback in a log, JSON (the relay's) or plain (gunicorn's, Python's).
NOISE = re.compile(
    r'"level":"(WARNING|ERROR|CRITICAL)"|\[(WARNING|ERROR|CRITICAL)\]|Warning|Traceback'
)


# Runs a command with Ctrl-C's default action, whatever this process inherited: a shell that
# runs the suite in the background starts it with SIGINT ignored, and bash cannot trap a signal
# that was ignored when it started (a default disposition survives exec; a handler would not).
INTERRUPTIBLE = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])",
]


def _session_state(sid: int) -> str:
    """The processes of a session and the signal state of its leader, for a failure message."""
    ps = subprocess.run(["ps", "-o", "pid,ppid,pgid,stat,wchan:24,args", "-s", str(sid)],
                        capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    try:
        with open(f"/proc/{sid}/status") as status:
            signals = [line for line in status if line.startswith(("Sig", "Shd"))]
    except OSError as exc:
        signals = [str(exc)]
    return ps + "".join(signals)


def _kill_left_behind(clone: Path) -> list[str]:
    """Kill what the script started and left running (its children run in sessions of their
    own, which a kill of its process group misses): every process working inside the clone.
    What was killed, for the failure message."""
    clone, killed = clone.resolve(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to see
        if cwd == clone or clone in cwd.parents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(args.strip())
    return killed


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to clone the project")
def test_run_command_brings_up_the_stack_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "chat-relay"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    port, sim_port, redis_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_PORT": str(port),
        "RELAY_SIM_PORT": str(sim_port),
        "RELAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        # With a key configured the relay is closed: the demo must use it.
        "RELAY_API_KEYS": "sk-relay-setup-test",
    }
    proc = subprocess.Popen(
        [*INTERRUPTIBLE, "bash", "deploy/run.sh", "--simulator"],  # no local model build in CI
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 500
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if "the stack is running" in line or time.monotonic() > deadline:
                break
        text = "".join(output)
        assert "the stack is running" in text, text[-3000:]
        assert "The quick brown fox" in text  # the demo reply streamed from the simulator
        assert "Models served (GET /v1/models): simulator" in text  # asked with the key
        assert f"The relay is up at http://127.0.0.1:{port}" in text
        # Each connection closed with its answer: one left open (requests keeps a 401's until
        # its response is collected) holds a web process in gunicorn's keep-alive wait through
        # the shutdown below, as long as the graceful timeout, whose warning fails this test.
        close = {"Connection": "close"}
        health = requests.get(f"http://127.0.0.1:{port}/healthz", headers=close, timeout=5)
        assert health.json()["redis"] == "ok"
        page = requests.get(f"http://127.0.0.1:{port}/", headers=close, timeout=5)
        assert page.ok and "text/html" in page.headers["Content-Type"]
        assert "/static/chat.js" in page.text  # the chat page, served by the stack it started
        assert requests.post(f"http://127.0.0.1:{port}/v1/jobs", json={"prompt": "x"},
                             headers=close, timeout=5).status_code == 401  # fmt: skip
        # Ctrl-C (SIGINT to the terminal's whole process group) stops everything the script
        # started, Redis last.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the stack did not stop on SIGINT:\n{_session_state(proc.pid)}")
        assert code == 130
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        for name in ("web.log", "worker.log"):
            log = (clone / ".local" / name).read_text()
            noisy = [line for line in log.splitlines() if NOISE.search(line)]
            assert not noisy, f"{name}: {noisy}"
        assert "stopped: 0 jobs running" in (clone / ".local" / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        left = _kill_left_behind(clone)
        assert not left, f"left running after the stack stopped (now killed): {left}"
