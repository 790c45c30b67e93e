"""Proof that compiled filters behave as written: each one is loaded by the kernel in a forked child.

For every phase, layout and default action, the child makes probe syscalls
(64-bit, 32-bit through int 0x80, and x32) and the test checks what the
kernel did. Listed syscalls succeed. The others fail with the configured
errno, kill the process with SIGSYS, or run and produce an audit SECCOMP
record (log). In the notify layouts the parent is the supervisor: it
receives each notification on the listener fd and replies to it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections.abc import Callable, Sequence

import pytest

from speaker.compile import Action, CompileSettings, compile_plan, notify_plan, phase_plan
from speaker.compile.actions import ActionKind
from speaker.compile.arches import KERNEL_ARCH_TOKENS, syscall_table
from speaker.events import PHASES, Phase
from tests.conftest import require_system
from tests.profiles.child import HARNESS, AuditRecords, ChildResult, Probe, int80_available, run_probes

#: Probes each phase lists, per arch. The x32 probe is allowed in running
#: only; this kernel lacks the x32 ABI, so an allowed x32 call fails with ENOSYS.
PHASE_PROBES: dict[Phase, dict[str, set[str]]] = {
    Phase.BOOTING: {"x86_64": {"getppid", "getuid"}, "x86": {"getppid"}},
    Phase.RUNNING: {"x86_64": {"getgid", "geteuid", "getppid"}, "x86": {"getgid32"}, "x32": {"getppid"}},
    Phase.SHUTDOWN: {"x86_64": {"getegid", "getpgrp"}, "x86": {"getegid32"}},
}
#: Probes no phase lists.
UNLISTED = {"x86_64": {"sched_yield", "gettid", "munlockall"}, "x86": {"sched_yield"}}
ALL_PROBES: list[Probe] = sorted(
    {Probe(arch, name) for lists in (*PHASE_PROBES.values(), UNLISTED) for arch, names in lists.items() for name in names},
    key=lambda probe: (probe.arch, probe.name),
)
DENY_ERRNO = errno.EACCES
DEFAULT_ACTIONS = {
    "kill-process": Action(ActionKind.KILL_PROCESS),
    "errno": Action(ActionKind.ERRNO, DENY_ERRNO),
    "log": Action(ActionKind.LOG),
}
#: The errno of the parent's reply to a denied notification, distinct from DENY_ERRNO.
SUPERVISOR_ERRNO = errno.EXDEV
SECCOMP_RET_LOG = 0x7FFC0000


def build_lists(extra: Sequence[str] = ()) -> dict[str, dict[Phase, frozenset[str]]]:
    lists: dict[str, dict[Phase, set[str]]] = {}
    for phase in PHASES:
        for arch in ("x86_64", "x86", "x32"):
            names = set(PHASE_PROBES[phase].get(arch, set()))
            if arch == "x86_64":
                names |= HARNESS | set(extra)
            lists.setdefault(arch, {})[phase] = names
    return {arch: {phase: frozenset(names) for phase, names in by_phase.items()} for arch, by_phase in lists.items()}


def allowed_result(probe: Probe, outcome_errno: int) -> bool:
    """Return whether an outcome shows the syscall ran.

    On a kernel without the x32 ABI (like the development host) an allowed
    x32 call passes the filter and then fails with ENOSYS.
    """
    if probe.arch == "x32":
        return outcome_errno in (0, errno.ENOSYS)
    return outcome_errno == 0


def logged_probes(audit: AuditRecords, run: Callable[[], ChildResult], count: int) -> tuple[ChildResult, set[tuple[int, int]]]:
    """Run the child until its ``count`` LOG records arrive (at most 3 times) and return the last result and records.

    Other tracers on a shared host can overflow the audit multicast group, and
    then records are missing although the filter logged them.
    """
    for _ in range(3):
        result = run()
        records = audit.wait_for(result.pid, count)
        logged = {(arch, nr) for arch, nr, code in records if code == SECCOMP_RET_LOG}
        if len(logged) >= count:
            break
    return result, logged


def check_unkilled(result: ChildResult, allowed: set[Probe], action: Action, logged: set[tuple[int, int]] | None) -> None:
    assert result.signal == 0, f"child killed by signal {result.signal}"
    assert result.exit_code == 0
    assert len(result.outcomes) == len(ALL_PROBES)
    for outcome in result.outcomes:
        probe = outcome.probe
        if probe in allowed or action.kind is ActionKind.LOG:
            assert allowed_result(probe, outcome.errno), (probe, os.strerror(outcome.errno))
        else:
            assert outcome.errno == action.errno, (probe, os.strerror(outcome.errno))
    if logged is not None:
        for probe in ALL_PROBES:
            key = (KERNEL_ARCH_TOKENS[probe.arch], probe.nr)
            assert (key in logged) == (probe not in allowed), (probe, sorted(logged))


def check_killed(bpf: bytes, allowed: set[Probe]) -> None:
    """Run the allowed probes and then each denied probe alone; each denied one must kill with SIGSYS."""
    permitted = [probe for probe in ALL_PROBES if probe in allowed]
    result = run_probes(bpf, permitted)
    assert result.signal == 0
    assert result.exit_code == 0
    assert all(allowed_result(outcome.probe, outcome.errno) for outcome in result.outcomes)
    for probe in ALL_PROBES:
        if probe in allowed:
            continue
        result = run_probes(bpf, [permitted[0], probe])
        assert result.signal == signal.SIGSYS, f"{probe} ended with signal {result.signal}, exit {result.exit_code}"
        assert len(result.outcomes) == 1
        assert allowed_result(permitted[0], result.outcomes[0].errno)


@pytest.fixture(scope="module", autouse=True)
def ia32_entry() -> None:
    require_system("32-bit syscalls (IA32 emulation)", int80_available(), "the kernel runs no int 0x80 syscalls")


@pytest.fixture(scope="module")
def audit() -> AuditRecords:
    try:
        records = AuditRecords()
    except PermissionError as exc:
        require_system("the audit multicast group", False, f"{exc}; run as root")
        raise
    with records:
        yield records


@pytest.mark.parametrize("action_name", list(DEFAULT_ACTIONS))
@pytest.mark.parametrize("phase", PHASES, ids=str)
def test_phase_filter_in_kernel(phase: Phase, action_name: str, request: pytest.FixtureRequest) -> None:
    action = DEFAULT_ACTIONS[action_name]
    audit = request.getfixturevalue("audit") if action.kind is ActionKind.LOG else None
    plan = phase_plan(build_lists(), phase, CompileSettings(default_action=action))
    bpf = compile_plan(plan).bpf
    allowed = {Probe(arch, name) for arch, names in PHASE_PROBES[phase].items() for name in names}
    if action.kind is ActionKind.KILL_PROCESS:
        check_killed(bpf, allowed)
    elif audit is not None:
        denied = [probe for probe in ALL_PROBES if probe not in allowed]
        result, logged = logged_probes(audit, lambda: run_probes(bpf, ALL_PROBES), len(denied))
        check_unkilled(result, allowed, action, logged)
    else:
        check_unkilled(run_probes(bpf, ALL_PROBES), allowed, action, None)


@pytest.mark.parametrize("action_name", list(DEFAULT_ACTIONS))
@pytest.mark.parametrize("exact", [False, True], ids=["notify", "notify-exact"])
def test_notify_layout_in_kernel(exact: bool, action_name: str, request: pytest.FixtureRequest) -> None:
    action = DEFAULT_ACTIONS[action_name]
    audit = request.getfixturevalue("audit") if action.kind is ActionKind.LOG else None
    lists = build_lists()
    plan = notify_plan(lists, CompileSettings(default_action=action), exact=exact)
    bpf = compile_plan(plan).bpf

    def in_lists(probe: Probe, phases: Sequence[Phase]) -> bool:
        return any(probe.name in lists[probe.arch][phase] for phase in phases)

    def in_every_phase(probe: Probe) -> bool:
        return all(probe.name in lists[probe.arch][phase] for phase in PHASES)

    in_kernel = {probe for probe in ALL_PROBES if in_lists(probe, [Phase.RUNNING]) and (not exact or in_every_phase(probe))}
    notified = {probe for probe in ALL_PROBES if in_lists(probe, PHASES) and probe not in in_kernel}
    # The parent plays a supervisor in the booting phase: it lets booting's
    # syscalls continue and fails the others with SUPERVISOR_ERRNO.
    booting = {(KERNEL_ARCH_TOKENS[probe.arch], probe.nr) for probe in ALL_PROBES if in_lists(probe, [Phase.BOOTING])}

    def answer(arch_token: int, nr: int) -> int:
        return 0 if (arch_token, nr) in booting else SUPERVISOR_ERRNO

    unlisted = [probe for probe in ALL_PROBES if probe not in in_kernel | notified]
    ordered = [probe for probe in ALL_PROBES if probe not in unlisted] + unlisted
    logged: set[tuple[int, int]] = set()
    if audit is not None:
        result, logged = logged_probes(audit, lambda: run_probes(bpf, ordered, listener=answer), len(unlisted))
    else:
        result = run_probes(bpf, ordered, listener=answer)

    assert sorted(result.notified) == sorted((probe.arch, probe.name) for probe in notified)
    for outcome in result.outcomes:
        probe = outcome.probe
        if probe in in_kernel or (probe in notified and (KERNEL_ARCH_TOKENS[probe.arch], probe.nr) in booting):
            assert allowed_result(probe, outcome.errno), (probe, os.strerror(outcome.errno))
        elif probe in notified:
            assert outcome.errno == SUPERVISOR_ERRNO, (probe, os.strerror(outcome.errno))
        elif action.kind is ActionKind.ERRNO:
            assert outcome.errno == DENY_ERRNO, probe
        elif action.kind is ActionKind.LOG:
            assert allowed_result(probe, outcome.errno), probe
    if action.kind is ActionKind.KILL_PROCESS:
        assert result.signal == signal.SIGSYS
        # The child dies at the first unlisted probe, after all listed ones.
        assert [outcome.probe for outcome in result.outcomes] == ordered[: len(ordered) - len(unlisted)]
    else:
        assert result.signal == 0
        assert len(result.outcomes) == len(ordered)
    if audit is not None:
        assert logged == {(KERNEL_ARCH_TOKENS[probe.arch], probe.nr) for probe in unlisted}


def test_clone3_gets_enosys_in_kernel() -> None:
    clone3 = Probe("x86_64", "clone3")
    lists = build_lists()
    errno_default = CompileSettings(default_action=Action(ActionKind.ERRNO, DENY_ERRNO))
    with_invariant = compile_plan(phase_plan(lists, Phase.RUNNING, errno_default)).bpf
    assert run_probes(with_invariant, [clone3]).outcomes[0].errno == errno.ENOSYS
    without = CompileSettings(default_action=errno_default.default_action, invariants=("exit", "exit_group", "rt_sigreturn", "restart_syscall"))
    assert run_probes(compile_plan(phase_plan(lists, Phase.RUNNING, without)).bpf, [clone3]).outcomes[0].errno == DENY_ERRNO
    kill_default = run_probes(compile_plan(phase_plan(lists, Phase.RUNNING, CompileSettings())).bpf, [clone3])
    assert kill_default.signal == 0
    assert kill_default.outcomes[0].errno == errno.ENOSYS


def test_exit_group_invariant_in_kernel() -> None:
    # The child ends with os._exit, which is exit_group. The lists leave it
    # out, so only the invariant lets the child exit normally.
    lists = {arch: {phase: names - {"exit", "exit_group"} for phase, names in by_phase.items()} for arch, by_phase in build_lists().items()}
    probe = [Probe("x86_64", "getppid")]
    with_invariant = run_probes(compile_plan(phase_plan(lists, Phase.RUNNING, CompileSettings())).bpf, probe)
    assert with_invariant.signal == 0
    assert with_invariant.exit_code == 0
    off = CompileSettings(invariants=("exit", "rt_sigreturn", "restart_syscall", "clone3_enosys"))
    dropped = run_probes(compile_plan(phase_plan(lists, Phase.RUNNING, off)).bpf, probe)
    assert dropped.signal == signal.SIGSYS
    assert len(dropped.outcomes) == 1


def test_rt_sigreturn_invariant_in_kernel() -> None:
    # Returning from a signal handler is rt_sigreturn: without it, a handled signal kills the process.
    libc = ctypes.CDLL(None, use_errno=True)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        pid_holder: list[int] = []

        def raise_signal() -> None:
            libc.kill(os.getpid() if not pid_holder else pid_holder[0], signal.SIGUSR1)

        lists = build_lists(extra=("kill", "getpid"))
        probe = [Probe("x86_64", "getppid")]
        with_invariant = run_probes(compile_plan(phase_plan(lists, Phase.RUNNING, CompileSettings())).bpf, probe, before_probes=raise_signal)
        assert with_invariant.signal == 0
        assert with_invariant.exit_code == 0
        off = CompileSettings(invariants=("exit", "exit_group", "restart_syscall", "clone3_enosys"))
        dropped = run_probes(compile_plan(phase_plan(lists, Phase.RUNNING, off)).bpf, probe, before_probes=raise_signal)
        assert dropped.signal == signal.SIGSYS
        assert dropped.outcomes == []
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_notify_layout_handled_signal_survives() -> None:
    # The lists leave rt_sigreturn and exit_group out of running, so the
    # notify layout would notify them. The listener denies every
    # notification, as the supervisor does in running for a booting-only
    # syscall. The invariants keep both in the kernel, so the handler returns
    # and the child exits normally.
    libc = ctypes.CDLL(None, use_errno=True)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        lists = build_lists(extra=("kill", "getpid"))
        running = lists["x86_64"][Phase.RUNNING] - {"rt_sigreturn", "exit_group"}
        lists["x86_64"] = {
            Phase.BOOTING: lists["x86_64"][Phase.BOOTING] | {"rt_sigreturn", "exit_group"},
            Phase.RUNNING: running,
            Phase.SHUTDOWN: lists["x86_64"][Phase.SHUTDOWN] | {"rt_sigreturn", "exit_group"},
        }
        bpf = compile_plan(notify_plan(lists, CompileSettings())).bpf
        result = run_probes(
            bpf,
            [Probe("x86_64", "getppid")],
            listener=lambda arch_token, nr: SUPERVISOR_ERRNO,
            before_probes=lambda: libc.kill(os.getpid(), signal.SIGUSR1),
        )
        assert result.signal == 0
        assert result.exit_code == 0
        assert not {"rt_sigreturn", "exit_group"} & {name for _, name in result.notified}
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_probe_numbers_match_kernel_tables() -> None:
    # Hand-checked against arch/x86/entry/syscalls/syscall_64.tbl and syscall_32.tbl.
    assert syscall_table("x86_64").number("getppid") == 110
    assert syscall_table("x86").number("getppid") == 64
    assert syscall_table("x86").number("getgid32") == 200
    assert syscall_table("x32").number("getppid") == 0x40000000 | 110
    assert syscall_table("x86_64").number("clone3") == 435
