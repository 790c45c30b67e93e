"""ExitWatch: which exits of an enforced container are failures, and the message that names them.

Also the enforce stage's warning about upstream components that would report
the same failure as an incomplete trace.

The real containers behind these cases run in test_e2e_failures.py and
test_e2e_audited.py; here the events are built by hand so that every branch
is covered.
"""

from __future__ import annotations

import dataclasses

import pytest
import structlog
import structlog.testing

from speaker.config import load_pipeline
from speaker.engine import Engine
from speaker.enforce_exits import SIGSYS_EXIT, ExitWatch
from speaker.events import ContainerAction, ContainerEvent, ContainerOutput, Phase, PhaseChange, SyscallRecord, Violation
from tests.conftest import ROOT

CONTAINER = "c0ffee" * 8


def watch_life(*events: object, default_kills: bool = True) -> list[str]:
    watch = ExitWatch(structlog.get_logger("test"), "out/enforce/violations.jsonl", default_kills)
    watch.observe(ContainerEvent(container_id=CONTAINER, action=ContainerAction.START, name="spk-x", pid=10))
    watch.observe(PhaseChange(container_id=CONTAINER, phase=Phase.BOOTING))
    for event in events:
        watch.observe(event)  # type: ignore[arg-type]
    return watch.problems()


def die(code: int | None) -> ContainerEvent:
    return ContainerEvent(container_id=CONTAINER, action=ContainerAction.DIE, name="spk-x", exit_code=code)


def violation(syscall: str, phase: Phase = Phase.BOOTING, action: str = "denied") -> Violation:
    return Violation(container_id=CONTAINER, phase=phase, pid=10, syscall=syscall, arch="x86_64", action=action)


def test_crash_while_booting_names_violation() -> None:
    problems = watch_life(
        violation("rt_sigreturn"),
        ContainerOutput(container_id=CONTAINER, stream="stderr", line="boom"),
        die(139),
    )
    assert problems == [
        "container spk-x exited with code 139 while booting under enforcement; 1 violation was reported "
        "(rt_sigreturn denied in booting); see out/enforce/violations.jsonl; last output: stderr: boom"
    ]


def test_violations_counted_and_limited() -> None:
    events = [violation("bind")] * 3 + [violation("listen"), violation("chroot"), violation("umask")]
    (problem,) = watch_life(*events, die(1))
    assert "6 violations were reported (bind denied in booting 3 times, listen denied in booting, " in problem
    assert "chroot denied in booting, and 1 more)" in problem


def test_sigsys_exit_explains_default_action() -> None:
    (problem,) = watch_life(die(SIGSYS_EXIT))
    assert problem.startswith("container spk-x exited with code 159 while booting under enforcement; ")
    assert "killed by SIGSYS because it made a syscall that no phase list allows" in problem
    assert "ausearch -m SECCOMP" in problem
    assert problem.endswith("; no violation was reported")


def test_sigsys_with_errno_default() -> None:
    (problem,) = watch_life(die(SIGSYS_EXIT), default_kills=False)
    assert "no phase list allows" not in problem
    assert "seccomp kill action" in problem


def test_sigsys_after_stop_still_fails() -> None:
    stop = ContainerEvent(container_id=CONTAINER, action=ContainerAction.KILL, signal=15)
    shutdown = PhaseChange(container_id=CONTAINER, phase=Phase.SHUTDOWN, previous=Phase.RUNNING)
    (problem,) = watch_life(stop, shutdown, die(SIGSYS_EXIT))
    assert "during shutdown under enforcement" in problem


def test_exit_after_stop_is_not_failure() -> None:
    running = PhaseChange(container_id=CONTAINER, phase=Phase.RUNNING, previous=Phase.BOOTING)
    stop = ContainerEvent(container_id=CONTAINER, action=ContainerAction.KILL, signal=9)
    # Docker's die event can reach the stage before the phase machine announces shutdown.
    assert watch_life(running, stop, die(137)) == []


def test_clean_exit_is_not_failure() -> None:
    assert watch_life(die(0)) == []
    assert watch_life(die(None)) == []


def test_crash_while_running() -> None:
    running = PhaseChange(container_id=CONTAINER, phase=Phase.RUNNING, previous=Phase.BOOTING)
    (problem,) = watch_life(running, violation("writev", Phase.RUNNING), die(1))
    assert problem.startswith("container spk-x exited with code 1 while running under enforcement; ")
    assert "(writev denied in running)" in problem
    assert problem.endswith("last output: (no output)")


def test_crash_before_restart_kept() -> None:
    start = ContainerEvent(container_id=CONTAINER, action=ContainerAction.START, name="spk-x", pid=11)
    stop = ContainerEvent(container_id=CONTAINER, action=ContainerAction.STOP)
    problems = watch_life(die(1), start, stop, die(0))
    assert len(problems) == 1
    assert problems[0].startswith("container spk-x exited with code 1 while booting under enforcement; ")


def test_crash_after_reload_signal() -> None:
    running = PhaseChange(container_id=CONTAINER, phase=Phase.RUNNING, previous=Phase.BOOTING)
    reload = ContainerEvent(container_id=CONTAINER, action=ContainerAction.KILL, signal=1)
    (problem,) = watch_life(running, reload, die(1))
    assert "while running under enforcement" in problem


def upstream_warnings(*overrides: str) -> list[dict]:
    spec = load_pipeline(ROOT / "pipelines" / "enforce.toml", overrides)
    engine = Engine(spec, handle_signals=False)
    engine.build()
    with structlog.testing.capture_logs() as logs:
        engine.components["enforce"]._check_upstream_reports()  # type: ignore[attr-defined]
    return [entry for entry in logs if entry["event"] == "tracing_report_on"]


def test_upstream_tracing_reports_warned() -> None:
    warnings = upstream_warnings("sources.docker.report_exit=true", "stages.phases.report_not_ready=true")
    assert sorted((entry["upstream"], entry["option"]) for entry in warnings) == [
        ("docker", "report_exit"),
        ("phases", "report_not_ready"),
    ]
    assert all(entry["log_level"] == "warning" for entry in warnings)


def test_upstream_tracing_reports_off() -> None:
    assert upstream_warnings("sources.docker.report_exit=false", "stages.phases.report_not_ready=false") == []


# --- Kills from the kernel's audit records -------------------------------------

#: Audit ``code`` values: SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_KILL_THREAD,
#: SECCOMP_RET_LOG, SECCOMP_RET_ERRNO with errno 1, SECCOMP_RET_USER_NOTIF.
KILL_PROCESS, KILL_THREAD, LOG, ERRNO_EPERM, USER_NOTIF = 0x80000000, 0x0, 0x7FFC0000, 0x00050001, 0x7FC00000


def record(
    action: int, container: str = CONTAINER, serial: int = 7, phase: Phase | None = Phase.RUNNING
) -> SyscallRecord:
    return SyscallRecord(
        container_id=container,
        pid=4242,
        comm="perl",
        arch="x86_64",
        nr=153,
        name="vhangup",
        action=action,
        serial=serial,
        record_time=1700000000.5,
        phase=phase,
    )


def started_watch() -> ExitWatch:
    watch = ExitWatch(structlog.get_logger("test"), "out/enforce/violations.jsonl")
    watch.observe(ContainerEvent(container_id=CONTAINER, action=ContainerAction.START, name="spk-x", pid=10))
    watch.observe(PhaseChange(container_id=CONTAINER, phase=Phase.RUNNING, previous=Phase.BOOTING))
    return watch


@pytest.mark.parametrize("action", [KILL_PROCESS, KILL_THREAD])
def test_kill_record_becomes_violation(action: int) -> None:
    violation = started_watch().kill_violation(record(action))
    assert violation is not None
    assert dataclasses.replace(violation, mono_time=0.0) == Violation(
        container_id=CONTAINER,
        wall_time=1700000000.5,
        mono_time=0.0,
        phase=Phase.RUNNING,
        pid=4242,
        comm="perl",
        syscall="vhangup",
        arch="x86_64",
        action="killed",
        nr=153,
    )


@pytest.mark.parametrize("action", [LOG, ERRNO_EPERM, USER_NOTIF])
def test_other_actions_ignored(action: int) -> None:
    watch = started_watch()
    with structlog.testing.capture_logs() as logs:
        assert watch.kill_violation(record(action)) is None
    assert logs == []
    assert watch.ignored_records == {"not_a_kill": 1}


def test_kill_in_other_container_ignored() -> None:
    watch = started_watch()
    assert watch.kill_violation(record(KILL_PROCESS, container="beef" * 16)) is None
    assert watch.ignored_records == {"not_enforced": 1}


def test_kill_in_two_phases_reported_once() -> None:
    # The phase machine sends a record from the tick of a kernel stop once
    # per phase; both copies have the record's audit serial.
    watch = started_watch()
    first = watch.kill_violation(record(KILL_PROCESS))
    second = watch.kill_violation(record(KILL_PROCESS, phase=Phase.SHUTDOWN))
    assert first is not None
    assert first.phase is Phase.RUNNING
    assert second is None
    assert watch.kill_violation(record(KILL_PROCESS, serial=8)) is not None


def test_kill_without_phase_takes_current() -> None:
    violation = started_watch().kill_violation(record(KILL_PROCESS, phase=None))
    assert violation is not None
    assert violation.phase is Phase.RUNNING


def test_kill_logged_once_per_syscall_and_phase() -> None:
    watch = started_watch()
    with structlog.testing.capture_logs() as logs:
        for serial in range(1, 6):
            watch.kill_violation(record(KILL_PROCESS, serial=serial))
    assert [(entry["event"], entry["syscall"], entry["phase"]) for entry in logs] == [
        ("process_killed", "vhangup", "running")
    ]


def test_sigsys_exit_names_audited_kill() -> None:
    watch = started_watch()
    violation = watch.kill_violation(record(KILL_PROCESS))
    assert violation is not None
    watch.observe(violation)
    watch.observe(die(SIGSYS_EXIT))
    (problem,) = watch.problems()
    assert problem == (
        "container spk-x exited with code 159 while running under enforcement; a process was killed by SIGSYS "
        "because it made a syscall that no phase list allows; the kernel's audit records name vhangup; "
        "1 violation was reported (vhangup killed in running); see out/enforce/violations.jsonl"
    )


def test_sigsys_exit_ignores_supervisor_kills() -> None:
    # A Violation "killed" from the supervisor (deny_action = "kill") ends
    # its process with SIGKILL, so it does not explain a SIGSYS exit.
    (problem,) = watch_life(violation("bind", action="killed"), die(SIGSYS_EXIT))
    assert "ausearch -m SECCOMP" in problem
    assert "audit records name" not in problem
