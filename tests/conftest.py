"""Shared fixtures, and the rule for tests that need parts of the host.

A test that needs Docker, audit, bpftrace or qemu calls ``require_system``.
On a developer machine without that part the test is skipped. In CI,
``.ci/run`` sets SPEAKER_REQUIRE_SYSTEM=1, and the same test fails instead,
so a broken CI host cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
PYTHON = sys.executable


def require_system(part: str, available: bool, why: str = "") -> None:
    """Skip, or fail under SPEAKER_REQUIRE_SYSTEM=1, unless ``part`` is available."""
    if available:
        return
    message = f"{part} is not available" + (f": {why}" if why else "")
    if os.environ.get("SPEAKER_REQUIRE_SYSTEM") == "1":
        pytest.fail(message + " (SPEAKER_REQUIRE_SYSTEM=1, so this must not skip)", pytrace=False)
    pytest.skip(message)


def _docker_ready() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "the docker command is not installed"
    result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if result.returncode != 0:
        return False, result.stderr.strip() or "docker info failed"
    return True, ""


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Require a running Docker daemon."""
    ok, why = _docker_ready()
    require_system("Docker", ok, why)


@pytest.fixture(scope="session")
def demo_images(docker_ready: None) -> dict[str, str]:
    """Build (or find cached) the speaker-demo images and return them by server name."""
    result = subprocess.run([str(ROOT / "images" / "build.sh")], capture_output=True, text=True)
    require_system("demo images", result.returncode == 0, result.stderr.strip())
    return {name: f"speaker-demo/{name}:latest" for name in ("redis", "nginx", "postgres")}


@pytest.fixture(scope="session")
def is_root() -> None:
    require_system("root privileges", os.geteuid() == 0, "run the tests as root")
