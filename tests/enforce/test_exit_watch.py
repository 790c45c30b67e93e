"""ExitWatch: which exits of an enforced container are failures, and the message that names them.

Also the enforce stage's warning about upstream components that would report
the same failure as an incomplete trace.

The real containers behind these cases run in test_e2e_failures.py; here the
events are built by hand so that every branch is covered.
"""

from __future__ import annotations

import structlog
import structlog.testing

from speaker.config import load_pipeline
from speaker.engine import Engine
from speaker.enforce_exits import SIGSYS_EXIT, ExitWatch
from speaker.events import ContainerAction, ContainerEvent, ContainerOutput, Phase, PhaseChange, Violation
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
