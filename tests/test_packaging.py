"""The project as a wheel: it carries the page's static files and templates, and building it
says nothing to worry about (no "Package would be ignored" for the data directories)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def test_the_wheel_holds_the_static_files_and_templates_and_builds_quietly(tmp_path: Path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the code
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("relay", "worker"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-3000:]
    assert "would be ignored" not in output and "SetuptoolsDeprecationWarning" not in output
    (wheel,) = (tmp_path / "dist").glob("chat_relay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        path.relative_to(ROOT).as_posix()
        for folder in ("relay/web/static", "relay/web/templates")
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
    }
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {"relay/core/jobs.py", "relay/web/app.py", "worker/main.py"} <= names
    assert not {n for n in names if n.startswith("tests/")}
