"""Kills by the filter's default action under pipelines/enforce-audited.toml, with real Docker, runc and audit.

A ``docker exec`` perl program makes one syscall that no phase list of the
traced redis profile allows. The kernel kills perl with SIGSYS, redis keeps
running, and only the kernel's SECCOMP audit record names the syscall. Under
enforce-audited.toml that record becomes a Violation "killed"; under
enforce.toml nothing reports it. Both runs exit 0, because the container
survives the kill (docs/enforcement.md, "When the container fails").
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from speaker.compile.arches import syscall_table
from speaker.events import PHASES
from speaker.profiles.directory import read_profile_dir
from tests.enforce.test_e2e import (  # noqa: F401 - session fixtures shared with test_e2e
    GO_FIFO,
    PREFIX,
    SERVERS,
    Background,
    container_pid,
    enforce_args,
    enforce_runtime,
    perl,
    read_violations,
    redis_answers,
    redis_with_exec,
    remove_container,
    traced,
)
from tests.enforce.test_e2e_failures import edited_lists, exit_code_from_docker, problems_of, run_failing

pytestmark = pytest.mark.system

#: Syscalls a test may make outside every list, in order of preference, with
#: their perl arguments. The kernel checks seccomp before the caller's
#: privileges, so the missing capabilities do not matter.
UNLISTED = (("vhangup", ""), ("munlockall", ""), ("acct", ", 0"))
#: A perl program that waits for a line on GO_FIFO and then makes syscall NR.
WAITING_PERL = f'open(my $go, "<", "{GO_FIFO}") or die; my $line = <$go>; syscall(NR ARGS); print "survived\\n";'
DELAY_DETECTOR = '{ type = "delay", after = "6s" }'


def expected_exit(problems: list[str], code: int) -> int:
    """Return the exit code a run should have: ``code``, or 3 when the audit source reported lost records.

    The audit source counts every SECCOMP record on the host, so a record
    lost or skipped from another user's trace makes the run incomplete
    (exit code 3, which outranks 1).
    """
    return 3 if any(problem.startswith("audit: ") for problem in problems) else code


def enforce_problems(problems: list[str]) -> list[str]:
    return [problem for problem in problems if not problem.startswith("audit: ")]


def unlisted_syscall(profile: Path) -> tuple[str, int, str]:
    """Return the first UNLISTED syscall that no phase list of ``profile`` has, with its x86_64 number."""
    lists, _ = read_profile_dir(profile)
    listed = set().union(*(lists.phase(phase) for phase in PHASES))
    numbers = syscall_table("x86_64").numbers
    highest = max(numbers[name] for name in listed if name in numbers)
    for name, args in UNLISTED:
        # runc fails syscalls numbered above every listed one with ENOSYS instead of the default action.
        if name not in listed and numbers[name] < highest:
            return name, numbers[name], args
    raise AssertionError(f"every one of {[name for name, _ in UNLISTED]} is listed in {profile}")


def perl_pid(name: str, timeout: float = 20) -> int:
    """Return the host pid of the perl process in container ``name``, once runc's init has executed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        top = subprocess.run(["docker", "top", name, "-o", "pid,comm"], capture_output=True, text=True)
        for line in top.stdout.splitlines()[1:]:
            pid, comm = line.split(None, 1)
            if comm.strip() == "perl":
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"perl did not start in {name}")


def exec_killed_perl(name: str, nr: int, args: str) -> tuple[int, int]:
    """Run the waiting perl program with docker exec and release it; return its host pid and docker exec's exit code."""
    fifo = Path(f"/proc/{container_pid(name)}/root{GO_FIFO}")
    fifo.unlink(missing_ok=True)
    subprocess.run(["mkfifo", str(fifo)], check=True)
    program = perl(WAITING_PERL, nr, args)
    running = subprocess.Popen(["docker", "exec", name, "perl", "-e", program], stdout=subprocess.PIPE, text=True)
    try:
        pid = perl_pid(name)
        # Opening a FIFO for writing blocks until perl has it open for reading.
        threading.Thread(target=lambda: fifo.write_text("go\n"), daemon=True).start()
        code = running.wait(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.stdout is not None
    assert running.stdout.read() == "", "perl survived its syscall"
    return pid, code


@pytest.mark.parametrize("pipeline", ["enforce-audited.toml", "enforce.toml"])
def test_exec_killed_by_default_action(redis_with_exec: Path, pipeline: str, tmp_path: Path) -> None:
    syscall, nr, args = unlisted_syscall(redis_with_exec)
    name = f"{PREFIX}audited-{uuid.uuid4().hex[:6]}"
    run = Background(
        ["run", f"pipelines/{pipeline}", *enforce_args(tmp_path, "redis", redis_with_exec, DELAY_DETECTOR, name)],
        tmp_path / "log.jsonl",
    )
    try:
        run.wait_for("phase_enforced", phase="running")
        pid, exec_code = exec_killed_perl(name, nr, args)
        # The kill reaches the stage through audit, classify and the phase machine.
        if pipeline == "enforce-audited.toml":
            run.wait_for("process_killed", timeout=20, syscall=syscall)
        assert redis_answers(container_pid(name))
        subprocess.run(["docker", "stop", name], capture_output=True, timeout=60)
        code = run.finish()
    finally:
        remove_container(name)
        run.finish()

    assert exec_code == 159  # 128 + SIGSYS, as docker exec reports it
    log = run.events()
    problems = problems_of(log)
    assert code == expected_exit(problems, 0), run.log_path.read_text()[-4000:]
    assert enforce_problems(problems) == []
    # The audit records pass through the phase machine, and the shutdown
    # list still applies as soon as Docker's kill event arrives.
    kill = next(entry for entry in log if entry.get("event") == "container_event" and entry.get("action") == "kill")
    shutdown = next(entry for entry in log if entry.get("event") == "phase_enforced" and entry["phase"] == "shutdown")
    delay = datetime.fromisoformat(shutdown["timestamp"]) - datetime.fromisoformat(kill["timestamp"])
    assert delay.total_seconds() < 0.8
    violations = read_violations(tmp_path)
    if pipeline == "enforce.toml":
        assert violations == []
        return
    assert [(item["syscall"], item["phase"], item["action"]) for item in violations] == [(syscall, "running", "killed")]
    (violation,) = violations
    assert violation["pid"] == pid
    assert violation["comm"] == "perl"
    assert violation["arch"] == "x86_64"
    assert violation["nr"] == nr
    container_id = next(entry["container"] for entry in log if entry.get("event") == "container_started")
    assert violation["container_id"].startswith(container_id)


def test_init_kill_names_syscall(traced, tmp_path: Path) -> None:
    # listen in no list: the default action kills redis itself while booting,
    # as in test_e2e_failures, and here the audit record names listen.
    lists = edited_lists(traced("redis"), tmp_path / "lists", "listen", shutdown_only=False)
    code, log, stderr, name = run_failing(tmp_path, lists, "pipelines/enforce-audited.toml")

    problems = problems_of(log)
    assert code == expected_exit(problems, 1), stderr[-4000:]
    assert exit_code_from_docker(log) == 159
    violations = read_violations(tmp_path)
    assert [(item["syscall"], item["phase"], item["action"], item["comm"]) for item in violations] == [
        ("listen", "booting", "killed", "redis-server")
    ]
    (problem,) = enforce_problems(problems)
    assert problem == (
        f"enforce: container {name} exited with code 159 while booting under enforcement; a process was killed "
        "by SIGSYS because it made a syscall that no phase list allows; the kernel's audit records name listen; "
        f"1 violation was reported (listen killed in booting); see {tmp_path / 'violations.jsonl'}"
    )
