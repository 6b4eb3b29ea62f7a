"""Packaging: the README's op table is current, and the wheel installs and imports in a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from reshift.ir.op_table import splice_into

REPO = Path(__file__).resolve().parents[1]


def test_readme_op_table_is_current():
    readme = (REPO / "README.md").read_text()
    assert splice_into(readme) == readme, "README op table is stale: run `make ops-table`"


def test_cli_entry_points_exist():
    out = subprocess.run([sys.executable, "-m", "reshift", "--help"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "inspect" in out.stdout


@pytest.mark.slow
def test_wheel_installs_and_imports_in_fresh_venv(tmp_path):
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(wheel_dir.glob("reshift-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # install the wheel's files with this interpreter's pip into the fresh venv's site-packages
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True
    )
    # dependencies (numpy, networkx, ...) come from this venv, but not its editable reshift
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    probe = (
        "import reshift, reshift.ir, reshift.passes, reshift.frontend, reshift.codegen, reshift.runtime, reshift.cli;"
        "print(reshift.__file__); print(reshift.ir.__file__)"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(site) for line in out.stdout.split()), out.stdout
    assert (Path(site) / "reshift" / "ir" / "ops.py").exists()
