"""Fixtures for the web tier's browser tests: a real headless Chromium (Debian's), driven by
Playwright's sync API with ``executable_path`` (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-background-networking",  # the network is closed: no update or sync requests
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        # deploy/test.sh installs it; CI must not pass by skipping.
        message = f"{CHROMIUM} is not installed (Debian package 'chromium')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()


NODE_DIR = Path(__file__).resolve().parents[2] / "node"


@dataclass(frozen=True)
class NodeClients:
    """tests/node, its npm packages installed: runs its scripts against the relay."""

    directory: Path

    def run(self, script: str, *args: str) -> Any:
        """What the script printed (one JSON value); a script that fails fails the test."""
        result = subprocess.run(
            ["node", script, *args], cwd=self.directory, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="session")
def node_clients() -> NodeClients:
    """tests/node with its npm packages installed (``npm ci``: the versions its lock file
    pins) where they are not already; Node and npm come from the machine (deploy/test.sh
    installs them where missing)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run the tests with deploy/test.sh")
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not all(_installed(name) == version for name, version in wanted.items()):
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=150,
        )
    return NodeClients(NODE_DIR)


def _installed(package: str) -> str | None:
    manifest = NODE_DIR / "node_modules" / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None
