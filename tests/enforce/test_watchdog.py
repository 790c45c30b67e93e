"""The watchdog process: it responds when the supervisor stalls, and dies with it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from speaker.events import Phase
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.system


class AgentProcess:
    def __init__(self, socket: Path, phase: Phase, timeout: float) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "tests.enforce.agent_process", str(socket), phase.value, str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"agent_process failed: {self.process.communicate()[1]}")
        ready = json.loads(line)
        self.pid, self.watchdog_pid = ready["ready"], ready["watchdog"]

    def finish(self) -> str:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
        _, stderr = self.process.communicate(input="", timeout=20)
        return stderr


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # kill(0) succeeds on a zombie too: read its state.
    with open(f"/proc/{pid}/stat") as file:
        return file.read().split(")")[-1].split()[0] == "Z"


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is stopped: kill() returns before the threads stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as file:
                states.append(file.read().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def test_stopped_supervisor_pending_denied(notify_ready, socket_dir, make_target) -> None:
    agent = AgentProcess(socket_dir / "supervisor.sock", Phase.BOOTING, timeout=0.5)
    try:
        target = make_target("c1")
        assert target.call("getpgid")[1] == 0
        os.kill(agent.pid, signal.SIGSTOP)
        wait_stopped(agent.pid)
        started = time.monotonic()
        # getpgid is allowed in booting, but the supervisor is stopped: the watchdog denies it.
        assert target.call("getpgid") == (-1, errno.EPERM)
        waited = time.monotonic() - started
        assert 0.4 < waited < 3.0
        os.kill(agent.pid, signal.SIGCONT)
        assert target.call("getpgid")[1] == 0
    finally:
        stderr = agent.finish()
    responses = [json.loads(line) for line in stderr.splitlines() if '"watchdog_responded"' in line]
    assert len(responses) == 1
    assert responses[0]["reason"] == "not_received"
    assert responses[0]["action"] == "denied"
    assert responses[0]["container"] == "c1"
    assert responses[0]["nr"] == 121


def test_killed_supervisor_gives_enosys(notify_ready, socket_dir, make_target) -> None:
    agent = AgentProcess(socket_dir / "supervisor.sock", Phase.BOOTING, timeout=0.5)
    target = make_target("c1")
    assert target.call("getpgid")[1] == 0
    os.kill(agent.pid, signal.SIGKILL)
    agent.process.wait(10)
    # PR_SET_PDEATHSIG takes the watchdog and its fd copies down too.
    deadline = time.monotonic() + 5
    while not process_gone(agent.watchdog_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(agent.watchdog_pid)
    assert target.call("getpgid") == (-1, errno.ENOSYS)
    assert target.call("getuid")[1] == 0


def test_stuck_judge_denied_by_watchdog(make_agent, make_target, monkeypatch) -> None:
    # The responder received the notification and then blocked: the watchdog
    # finds the id in flight for longer than the timeout and denies it.
    agent = make_agent(response_timeout=0.4, shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    release = threading.Event()
    monkeypatch.setattr(agent, "judge", lambda listener, notification: release.wait(10))
    target = make_target("c1")
    started = time.monotonic()
    assert target.call("getpgid") == (-1, errno.EPERM)
    assert 0.3 < time.monotonic() - started < 3.0
    release.set()
    assert agent.check_watchdog() == 1


def test_stuck_hold_denied_by_watchdog(make_agent, make_target, monkeypatch) -> None:
    # The hold keeper never decides: the watchdog denies the hold once its
    # deadline is a whole timeout in the past.
    agent = make_agent(response_timeout=0.3, shutdown_grace=0.3)
    agent.set_phase("c1", Phase.RUNNING)
    monkeypatch.setattr(agent.keeper, "_resolve", lambda hold, notify, now: False)
    target = make_target("c1")
    started = time.monotonic()
    assert target.call("getsid") == (-1, errno.EPERM)
    assert 0.5 < time.monotonic() - started < 3.0


def test_stopped_supervisor_connection_taken_over(notify_ready, socket_dir, make_target) -> None:
    # A container that starts while the supervisor is stopped hands its fd
    # to the socket's backlog. The watchdog accepts it and denies its
    # notifications, so runc fails instead of waiting forever.
    agent = AgentProcess(socket_dir / "supervisor.sock", Phase.BOOTING, timeout=0.5)
    try:
        os.kill(agent.pid, signal.SIGSTOP)
        wait_stopped(agent.pid)
        target = make_target("c2")
        started = time.monotonic()
        assert target.call("getpgid") == (-1, errno.EPERM)
        assert time.monotonic() - started < 3.0
        # Later notifications of that fd are denied at once.
        started = time.monotonic()
        assert target.call("getppid") == (-1, errno.EPERM)
        assert time.monotonic() - started < 0.5
    finally:
        stderr = agent.finish()
    accepted = [json.loads(line) for line in stderr.splitlines() if '"watchdog_accepted"' in line]
    assert len(accepted) == 1
    assert accepted[0]["container"] == "c2"
    responses = [json.loads(line) for line in stderr.splitlines() if '"watchdog_responded"' in line]
    assert [response["reason"] for response in responses] == ["not_accepted", "not_accepted"]
