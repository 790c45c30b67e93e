"""Fixtures for the enforcement tests: a root-only socket directory, a notify agent, and target processes."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from speaker.events import Phase
from speaker.notify.agent import AgentSettings, NotifyAgent
from speaker.notify.ioctl import kernel_notif_sizes
from speaker.notify.policy import PhasePolicy
from tests.conftest import require_system
from tests.enforce.target import Target

#: Names of what these tests create on the host (containers, the runtime
#: entry in daemon.json and its launcher, socket directories) start with this.
#: On a host that others share, set SPEAKER_TEST_PREFIX to a prefix of your own.
TEST_PREFIX = os.environ.get("SPEAKER_TEST_PREFIX", "speaker-test-")
#: Every socket directory of these tests starts with this, under /run/speaker.
SOCKET_PREFIX = f"{TEST_PREFIX}sock-"

#: Phase lists of the target tests. getpgid is booting-only, getsid
#: shutdown-only, getppid in every phase, and sched_yield in none.
LISTS = {
    Phase.BOOTING: {"getpgid", "getppid"},
    Phase.RUNNING: {"getppid"},
    Phase.SHUTDOWN: {"getsid", "getppid"},
}


def notify_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "loading notify filters and reading other processes' /proc entries needs root"
    try:
        kernel_notif_sizes()
    except OSError as exc:
        return False, f"seccomp(SECCOMP_GET_NOTIF_SIZES) failed: {exc.strerror}"
    return True, ""


@pytest.fixture
def notify_ready() -> None:
    ok, why = notify_available()
    require_system("seccomp user notification", ok, why)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A fresh root-only directory under /run/speaker for one test's socket."""
    directory = Path("/run/speaker") / f"{SOCKET_PREFIX}{uuid.uuid4().hex[:8]}"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_agent(notify_ready: None, socket_dir: Path) -> Iterator:
    """Return a function that starts a NotifyAgent with LISTS; every agent is stopped after the test."""
    agents: list[NotifyAgent] = []

    def start(**settings: object) -> NotifyAgent:
        log = structlog.get_logger("speaker").bind(component="test_agent")
        agent = NotifyAgent(AgentSettings(socket_path=socket_dir / "supervisor.sock", **settings), log)
        agent.set_policy(PhasePolicy.for_arches(LISTS))
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()


@pytest.fixture
def make_target(socket_dir: Path) -> Iterator:
    """Return a function that starts a Target for a container id; every target is ended after the test."""
    targets: list[Target] = []

    def start(container_id: str = "c1", **kwargs: object) -> Target:
        target = Target(socket_dir / "supervisor.sock", container_id, **kwargs)
        targets.append(target)
        return target

    yield start
    for target in targets:
        target.close()
