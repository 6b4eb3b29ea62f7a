"""Tool discovery: a test whose system tool is missing skips with the reason, never fails.

The check that would have caught the arm64 cross builds failing on a fresh machine: the suite's
cross-build tests run in a subprocess whose PATH hides ``aarch64-linux-gnu-gcc``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system_tools import REQUIRE_ENV, SYSTEM_TOOLS, missing_reason, require_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSS_CC = "aarch64-linux-gnu-gcc"


def path_without(tool: str, shim_dir: Path) -> str:
    """A PATH holding links to every executable on the current PATH except ``tool``."""
    shim_dir.mkdir(parents=True, exist_ok=True)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = shim_dir / entry.name
            if entry.name == tool or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(shim_dir)


def test_every_tool_names_its_package():
    for tool, package in SYSTEM_TOOLS.items():
        assert package in missing_reason(tool) and tool in missing_reason(tool)


def test_missing_tool_skips_with_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{CROSS_CC}.*gcc-aarch64-linux-gnu"):
        require_tool(CROSS_CC)


def test_required_tool_fails_instead_of_skipping(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(REQUIRE_ENV, f"other,{CROSS_CC}")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        require_tool(CROSS_CC)


def test_present_tool_is_found(monkeypatch, tmp_path):
    tool = tmp_path / CROSS_CC
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert require_tool(CROSS_CC) == str(tool)


@pytest.mark.slow
def test_cross_build_tests_skip_when_the_cross_compiler_is_hidden(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != REQUIRE_ENV}
    env["PATH"] = path_without(CROSS_CC, tmp_path / "bin")
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    argv += ["-k", "cross_builds_arm64 or cross_compiled"]
    argv += ["tests/test_codegen_tvm.py", "tests/test_api.py"]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout[-3000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "failed" not in summary and "error" not in summary.lower(), summary
    skips = [line for line in summary.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(CROSS_CC in line and "gcc-aarch64-linux-gnu" in line for line in skips), summary
    assert " skipped" in summary.splitlines()[-1], summary
