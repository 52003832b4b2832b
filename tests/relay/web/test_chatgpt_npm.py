"""The `chatgpt` npm package's ChatGPTAPI (what chatgpt-web's back end runs) pointed at the relay.

The package is installed from the npm registry into tests/node by the fixture below
(`npm ci`, pinned by tests/node/package-lock.json); Node itself comes from the machine
(deploy/test.sh installs Debian's nodejs and npm where missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from relay.dev.simulator import reply_text
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="session")
def node_clients() -> Path:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run the tests with deploy/test.sh")
    if not (NODE_DIR / "node_modules" / "chatgpt").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=150,
        )
    return NODE_DIR


def test_chatgpt_api_holds_a_three_turn_conversation_with_a_key(node_clients, stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "npm-key-1"})
    stack.start_worker()
    result = subprocess.run(
        ["node", "chatgpt_api.mjs", base, "npm-key-1"],
        cwd=node_clients,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = reply_text({})  # the simulator's default reply
    assert out["first"]["text"] == expected
    assert out["finishReason"] == "stop"
    assert len(set(out["progress"])) >= 3 and out["progress"][-1] == expected
    assert out["third"]["text"] == expected
    assert len({out[turn]["id"] for turn in ("first", "second", "third")}) == 3
    # The package rebuilt the history itself; the upstream got the whole chain through the relay.
    bodies = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    sent = next(b for b in reversed(bodies) if b["messages"][-1]["content"] == "A third turn")
    assert sent["messages"][-5:] == [
        {"role": "user", "content": "Hello from the chatgpt package"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "A follow-up"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "A third turn"},
    ]
