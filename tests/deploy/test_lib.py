"""deploy/lib.sh's choice of interpreter for the virtualenv it makes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def base_python(env: dict[str, str]) -> str:
    """What ``base_python`` in deploy/lib.sh answers with ``env`` (RELAY_* from the caller's
    environment left out)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    done = subprocess.run(["bash", "-c", f"source {ROOT}/deploy/lib.sh && base_python"],
                          env={**clean, **env}, capture_output=True, text=True, timeout=30,
                          check=True)  # fmt: skip
    return done.stdout.strip()


def test_relay_python_names_the_interpreter():
    assert base_python({"RELAY_PYTHON": sys.executable}) == sys.executable


def _system_python_is_new_enough() -> bool:
    system = Path("/usr/bin/python3")
    if not system.exists():
        return False
    check = "import sys; sys.exit(sys.version_info < (3, 11))"
    return subprocess.run([str(system), "-c", check], timeout=30).returncode == 0


@pytest.mark.skipif(not _system_python_is_new_enough(), reason="no /usr/bin/python3 >= 3.11")
def test_the_distributions_python_is_preferred_to_the_one_on_path():
    # This machine's PATH starts with pyenv's python3 (built without profile-guided
    # optimisation); the distribution's is the one the relay runs faster on.
    assert base_python({}) == "/usr/bin/python3"
