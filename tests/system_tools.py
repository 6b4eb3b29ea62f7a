"""The system tools some tests need, where they come from, and how a test asks for one.

A test that needs a tool outside Python calls :func:`require_tool`: it returns the tool's path,
or skips the test with a reason naming the tool, its Debian package and the command that installs
it, so pytest's summary (``-ra``) shows why. ``make system-tools`` (run by ``make test`` and
``.ci/run``) installs the packages when it runs as root on a Debian/Ubuntu machine.

``RESHIFT_REQUIRE_TOOLS`` (comma-separated tool names, or ``all``) turns the skip into a failure:
``.ci/run`` sets it after installing the tools, so CI cannot go green by skipping the arm64 builds.
"""

from __future__ import annotations

import os
import shutil

import pytest

# tool -> the Debian package that provides it (the Makefile's SYSTEM_PACKAGES installs these)
SYSTEM_TOOLS: dict[str, str] = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "qemu-aarch64-static": "qemu-user-static",
}
REQUIRE_ENV = "RESHIFT_REQUIRE_TOOLS"


def missing_reason(tool: str) -> str:
    """Why a test that needs ``tool`` cannot run here, and what installs it."""
    package = SYSTEM_TOOLS.get(tool)
    how = f"`make system-tools` as root, or `apt-get install {package}`" if package else "install it"
    return f"needs {tool!r}, which is not on PATH ({how})"


def required(tool: str) -> bool:
    """True when ``RESHIFT_REQUIRE_TOOLS`` says a missing ``tool`` fails the test instead of skipping it."""
    names = {name.strip() for name in os.environ.get(REQUIRE_ENV, "").split(",") if name.strip()}
    return "all" in names or tool in names


def require_tool(tool: str) -> str:
    """The path of ``tool``; skip the calling test with the reason when it is missing (fail if required)."""
    path = shutil.which(tool)
    if path is not None:
        return path
    reason = missing_reason(tool)
    if required(tool):
        pytest.fail(f"{reason}; {REQUIRE_ENV} requires it", pytrace=False)
    pytest.skip(reason)
