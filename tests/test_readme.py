"""The README's shell blocks marked ``runnable`` (```` ```sh runnable ````) work as pasted.

They run in order, in one bash in the repository's directory, against a live stack (redis-server,
the simulator, gunicorn, a worker) whose address replaces the README's ``localhost:8000``; a
command that fails fails the test (``set -e``), so the README cannot drift from the product.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUNNABLE = re.compile(r"^```sh runnable\n(.*?)^```$", re.M | re.S)


def runnable_blocks(text: str) -> list[str]:
    return RUNNABLE.findall(text)


def test_the_runnable_blocks_are_found():
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 4 and all("localhost:8000" in block for block in blocks)


def test_the_readme_runs_as_pasted(stack: Stack):
    base = stack.start_web()
    stack.start_worker()
    script = "\n".join(runnable_blocks((ROOT / "README.md").read_text()))
    script = script.replace("localhost:8000", base.removeprefix("http://"))
    script = script.replace(".venv/bin/python", sys.executable)  # the venv running the tests
    ran = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **stack.settings()},
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = ran.stdout
    assert ran.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{ran.stderr[-3000:]}"
    assert out.count("data: [DONE]") >= 3  # the whole stream, resumed, cancelled
    assert '"finish_reason":"cancelled"' in out  # the cancel example cancelled a live job
    assert re.search(r'"status": ?"cancelled"', out)
    assert '"code":"job_already_ended"' in out  # and says so when asked again
    assert out.count('"status":"queued"') >= 3  # the jobs (one by a key, one a follow-up)
    assert "deleted 1 key(s)" in out
    assert "message_not_found" not in out and "invalid_api_key" not in out
