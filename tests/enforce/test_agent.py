"""The notify agent against real seccomp filters: phase decisions, holds, modes and fd lifecycle.

Each target process loads a filter that notifies getpgid, getsid, getppid and
sched_yield (see conftest.LISTS for what each phase allows) and hands its
listener to the agent over the agent's socket, as runc does.
"""

from __future__ import annotations

import errno
import time

import pytest

from speaker.events import Phase
from speaker.notify.policy import PhasePolicy
from tests.enforce.conftest import LISTS
from tests.enforce.target import NOTIFIED

pytestmark = pytest.mark.system


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.01)


def test_booting_allows_booting_and_running(make_agent, make_target) -> None:
    agent = make_agent()
    target = make_target("c1")
    assert target.call("getpgid")[1] == 0
    assert target.call("getppid")[1] == 0
    assert target.call("getsid") == (-1, errno.EPERM)


def test_running_denies_booting_only(make_agent, make_target) -> None:
    agent = make_agent(shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    assert target.call("getppid")[1] == 0
    assert target.call("getpgid") == (-1, errno.EPERM)
    assert target.call("sched_yield") == (-1, errno.EPERM)


def test_denied_clone3_fails_with_enosys(make_agent, make_target) -> None:
    # glibc falls back to clone only on ENOSYS; other denials stay EPERM.
    agent = make_agent(shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1", names=(*NOTIFIED, "clone3"))
    assert target.call("clone3") == (-1, errno.ENOSYS)
    assert target.call("sched_yield") == (-1, errno.EPERM)


def test_violation_fields(make_agent, make_target) -> None:
    agent = make_agent(shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    target.call("getpgid")
    violations = agent.take_violations()
    assert len(violations) == 1
    violation = violations[0]
    assert violation.container_id == "c1"
    assert violation.phase is Phase.RUNNING
    assert violation.syscall == "getpgid"
    assert violation.nr == 121
    assert violation.arch == "x86_64"
    assert violation.pid == target.pid
    assert violation.comm == "python"
    assert violation.action == "denied"


def test_shutdown_allows_shutdown_only(make_agent, make_target) -> None:
    agent = make_agent()
    agent.set_phase("c1", Phase.SHUTDOWN)
    target = make_target("c1")
    assert target.call("getsid")[1] == 0
    assert target.call("getpgid") == (-1, errno.EPERM)


def test_held_syscall_allowed_when_stop_arrives(make_agent, make_target) -> None:
    # getsid is shutdown-only: in running it waits for the stop.
    agent = make_agent(shutdown_grace=5.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    target.send("call", "getsid")
    time.sleep(0.3)
    assert target.process.poll() is None
    assert agent.keeper.pending == 1
    started = time.monotonic()
    agent.set_phase("c1", Phase.SHUTDOWN)
    result = target._read()
    assert result["errno"] == 0
    assert time.monotonic() - started < 1.0
    assert agent.take_violations() == []


def test_held_syscall_denied_after_grace(make_agent, make_target) -> None:
    agent = make_agent(shutdown_grace=0.4)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    started = time.monotonic()
    assert target.call("getsid") == (-1, errno.EPERM)
    waited = time.monotonic() - started
    assert 0.35 < waited < 2.0
    assert [v.syscall for v in agent.take_violations()] == ["getsid"]


def test_complain_mode_allows_and_reports(make_agent, make_target) -> None:
    agent = make_agent(mode="complain", shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    assert target.call("getpgid")[1] == 0
    assert target.call("sched_yield")[1] == 0
    violations = agent.take_violations()
    assert [(v.syscall, v.action) for v in violations] == [("getpgid", "allowed"), ("sched_yield", "allowed")]


def test_complain_report_dropped_on_stop(make_agent, make_target) -> None:
    agent = make_agent(mode="complain", shutdown_grace=1.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    started = time.monotonic()
    assert target.call("getsid")[1] == 0
    # Allowed at once: complain mode never makes the application wait.
    assert time.monotonic() - started < 0.5
    agent.set_phase("c1", Phase.SHUTDOWN)
    time.sleep(1.3)
    assert agent.take_violations() == []


def test_kill_action_kills_process(make_agent, make_target) -> None:
    agent = make_agent(deny_action="kill", shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    target.send("call", "getpgid")
    assert target.process.wait(5) == -9
    assert [v.action for v in agent.take_violations()] == ["killed"]


def test_phase_change_applies_to_running_listener(make_agent, make_target) -> None:
    agent = make_agent(shutdown_grace=0.0)
    target = make_target("c1")
    assert target.call("getpgid")[1] == 0
    agent.set_phase("c1", Phase.RUNNING)
    assert target.call("getpgid") == (-1, errno.EPERM)


def test_containers_keep_separate_phases(make_agent, make_target) -> None:
    agent = make_agent(shutdown_grace=0.0)
    agent.set_phase("a", Phase.RUNNING)
    first = make_target("a")
    second = make_target("b")
    assert first.call("getpgid") == (-1, errno.EPERM)
    assert second.call("getpgid")[1] == 0


def test_second_listener_of_container_shares_phase(make_agent, make_target) -> None:
    # A docker exec process hands over its own fd for the same container id.
    agent = make_agent(shutdown_grace=0.0)
    first = make_target("c1")
    agent.set_phase("c1", Phase.RUNNING)
    second = make_target("c1")
    assert first.call("getpgid") == (-1, errno.EPERM)
    assert second.call("getpgid") == (-1, errno.EPERM)
    assert len(agent.containers["c1"].listeners) == 2


def test_listener_closes_when_target_exits(make_agent, make_target) -> None:
    agent = make_agent()
    target = make_target("c1")
    target.call("getppid")
    assert len(agent.containers["c1"].listeners) == 1
    assert target.close() == 0
    wait_for(lambda: not agent.containers["c1"].listeners)
    wait_for(lambda: len(agent._free_slots) == agent.settings.max_listeners)


def test_stopped_agent_gives_enosys(make_agent, make_target) -> None:
    agent = make_agent()
    target = make_target("c1")
    assert target.call("getpgid")[1] == 0
    agent.stop()
    assert target.call("getpgid") == (-1, errno.ENOSYS)
    # Syscalls that the filter allows in the kernel are unaffected.
    assert target.call("getuid")[1] == 0


@pytest.mark.parametrize("receive", ["block", "poll"])
def test_receive_modes_decide_alike(make_agent, make_target, receive: str) -> None:
    agent = make_agent(blocking_receive=receive == "block", shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1")
    assert target.call("getppid")[1] == 0
    assert target.call("getpgid") == (-1, errno.EPERM)
    wait_for(lambda: agent.containers["c1"].listeners)
    assert agent.containers["c1"].listeners[0].mode == receive


def test_runtime_init_judged_as_booting(make_agent, make_target) -> None:
    # The target names its own pid as the process that loaded the filter and
    # never executes another program, so the agent takes it for the runtime's
    # init and judges it by the booting list even in running.
    agent = make_agent(shutdown_grace=0.0)
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1", message_pid=-1)
    assert target.call("getpgid")[1] == 0
    assert target.call("getsid") == (-1, errno.EPERM)


def test_runtime_init_ends_at_exec(make_agent, make_target) -> None:
    # The first execve of the process that loaded the filter ends its
    # runtime-init exemption: afterwards the program is judged by the phase.
    agent = make_agent(shutdown_grace=0.0)
    lists = {phase: {*names, "execve"} for phase, names in LISTS.items()}
    agent.set_policy(PhasePolicy.for_arches(lists))
    agent.set_phase("c1", Phase.RUNNING)
    target = make_target("c1", message_pid=-1, names=("getpgid", "getppid", "execve"))
    assert target.call("getpgid")[1] == 0
    assert target.exec() == target.pid
    assert target.call("getpgid") == (-1, errno.EPERM)
    listener = agent.containers["c1"].listeners[0]
    assert listener.runtime_execed
    assert [v.syscall for v in agent.take_violations()] == ["getpgid"]


EXACT_LISTS = {
    Phase.BOOTING: {"getpgid", "getppid"},
    Phase.RUNNING: {"getppid", "sched_yield"},
    Phase.SHUTDOWN: {"getsid", "getppid"},
}


def test_exact_booting_denies_running_only(make_agent, make_target) -> None:
    agent = make_agent(running_grace=0.0)
    agent.set_policy(PhasePolicy.for_arches(EXACT_LISTS, exact=True))
    target = make_target("c1")
    assert target.call("sched_yield") == (-1, errno.EPERM)
    assert target.call("getpgid")[1] == 0


def test_running_margin_allows_both_lists(make_agent, make_target) -> None:
    agent = make_agent(running_grace=0.0)
    agent.set_policy(PhasePolicy.for_arches(EXACT_LISTS, exact=True))
    agent.set_phase("c1", Phase.BOOTING, also=Phase.RUNNING)
    target = make_target("c1")
    assert target.call("sched_yield")[1] == 0
    assert target.call("getpgid")[1] == 0
    assert target.call("getsid") == (-1, errno.EPERM)


def test_running_only_held_until_running(make_agent, make_target) -> None:
    agent = make_agent(running_grace=5.0)
    agent.set_policy(PhasePolicy.for_arches(EXACT_LISTS, exact=True))
    target = make_target("c1")
    target.send("call", "sched_yield")
    time.sleep(0.3)
    assert agent.keeper.pending == 1
    agent.set_phase("c1", Phase.BOOTING, also=Phase.RUNNING)
    assert target._read()["errno"] == 0
    assert agent.take_violations() == []
