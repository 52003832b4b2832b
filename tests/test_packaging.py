"""The project as a wheel: it carries the page's static files and templates, and building it,
or installing it editable as deploy/lib.sh does, says nothing to worry about."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def source_copy(tmp_path: Path) -> Path:
    """The project's packaged files, copied: building writes build/ and *.egg-info beside them."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("relay", "worker"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return source


def test_the_wheel_holds_the_static_files_and_templates_and_builds_quietly(tmp_path: Path):
    source = source_copy(tmp_path)
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


def test_the_editable_install_is_a_plain_path_entry_and_quiet(tmp_path: Path):
    """What ``deploy/run.sh`` prints on a fresh clone: no setuptools warning about folders
    that "may take precedence during imports" (its import-hook strategy)."""
    source = source_copy(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    built = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])",
         str(dist)],
        cwd=source, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-3000:]
    assert "careful" not in output and "Warning" not in output, output[-3000:]
    (wheel,) = dist.glob("chat_relay-*.whl")
    files = zipfile.ZipFile(wheel)
    (pth,) = [n for n in files.namelist() if n.endswith(".pth")]
    assert files.read(pth).decode().strip() == str(source)
    assert not [n for n in files.namelist() if n.endswith("_finder.py")]
