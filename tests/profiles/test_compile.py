"""Filter plans and compiled BPF, checked syscall by syscall with an independent BPF interpreter."""

from __future__ import annotations

import errno

import pytest

from speaker.compile import (
    Action,
    CompileSettings,
    EmptyPhase,
    Layout,
    UnknownSyscall,
    compile_plan,
    compile_profile,
    filter_event,
    notify_plan,
    phase_plan,
    plan_layout,
)
from speaker.compile.actions import ALLOW, ENOSYS, KILL_PROCESS, LOG, NOTIFY, ActionKind
from speaker.compile.arches import X32_SYSCALL_BIT, syscall_table
from speaker.compile.bpf import BpfError, action_for, check_program, parse_program, syscall_actions
from speaker.events import PHASES, Phase
from speaker.profiles import load_profile
from tests.conftest import DATA

BOOTING = frozenset({"read", "write", "execve", "mount", "openat", "close"})
RUNNING = frozenset({"read", "write", "epoll_wait", "close", "accept4"})
SHUTDOWN = frozenset({"read", "write", "unlink", "close"})
LISTS = {"x86_64": {Phase.BOOTING: BOOTING, Phase.RUNNING: RUNNING, Phase.SHUTDOWN: SHUTDOWN}}
DEFAULT_ACTIONS = [KILL_PROCESS, Action(ActionKind.ERRNO, errno.EACCES), LOG]
INVARIANT_ACTIONS = {
    "exit": ALLOW,
    "exit_group": ALLOW,
    "rt_sigreturn": ALLOW,
    "restart_syscall": ALLOW,
    "clone3": ENOSYS,
}
#: Names the invariants touch on some arch; x86 also has the old sigreturn.
INVARIANT_NAMES = set(INVARIANT_ACTIONS) | {"sigreturn"}


def expected_phase_action(names: frozenset[str], name: str, default: Action) -> Action:
    if name in names:
        return ALLOW
    return INVARIANT_ACTIONS.get(name, default)


@pytest.mark.parametrize("default", DEFAULT_ACTIONS, ids=str)
@pytest.mark.parametrize("phase", PHASES, ids=str)
def test_phase_filter_every_syscall(phase: Phase, default: Action) -> None:
    plan = phase_plan(LISTS, phase, CompileSettings(default_action=default))
    program = parse_program(compile_plan(plan).bpf)
    check_program(program)
    names = LISTS["x86_64"][phase]
    actions = syscall_actions(program)
    for name, action in actions["x86_64"].items():
        assert action == expected_phase_action(names, name, default), name
    # The profile has no 32-bit or x32 syscalls, so those arches allow only the invariants.
    for arch in ("x86", "x32"):
        allowed = {name for name, action in actions[arch].items() if action == ALLOW}
        assert allowed == {"exit", "exit_group", "rt_sigreturn", "restart_syscall"} | ({"sigreturn"} if arch == "x86" else set())


@pytest.mark.parametrize("default", DEFAULT_ACTIONS, ids=str)
@pytest.mark.parametrize("exact", [False, True], ids=["notify", "notify-exact"])
def test_notify_filter_every_syscall(exact: bool, default: Action) -> None:
    plan = notify_plan(LISTS, CompileSettings(default_action=default), exact=exact)
    # Worked out by hand from the lists above.
    if exact:
        in_kernel = {"read", "write", "close"}
        notified = {"execve", "mount", "openat", "epoll_wait", "accept4", "unlink"}
    else:
        in_kernel = {"read", "write", "epoll_wait", "close", "accept4"}
        notified = {"execve", "mount", "openat", "unlink"}
    assert plan.allowed - INVARIANT_NAMES == in_kernel
    assert plan.notified == notified
    actions = syscall_actions(parse_program(compile_plan(plan).bpf))["x86_64"]
    for name, action in actions.items():
        if name in in_kernel:
            assert action == ALLOW, name
        elif name in notified:
            assert action == NOTIFY, name
        else:
            assert action == INVARIANT_ACTIONS.get(name, default), name


def test_notify_layout_never_notifies_allowing_invariants() -> None:
    # A trace can miss rt_sigreturn or exit_group in running (redis handles
    # no signal while it serves). Notified, the supervisor would deny them
    # in running, and a handled signal would crash the process.
    only_booting = {"exit", "exit_group", "rt_sigreturn", "restart_syscall", "clone3"}
    lists = {"x86_64": {Phase.BOOTING: BOOTING | only_booting, Phase.RUNNING: RUNNING, Phase.SHUTDOWN: SHUTDOWN}}
    for exact in (False, True):
        plan = notify_plan(lists, CompileSettings(), exact=exact)
        for name in ("exit", "exit_group", "rt_sigreturn", "restart_syscall"):
            assert plan.action("x86_64", name) == ALLOW, name
        # clone3 stays with the supervisor: ENOSYS in booting would send glibc
        # to clone, which the trace may never have seen.
        assert plan.action("x86_64", "clone3") == NOTIFY


def test_union_filter_allows_all_phases() -> None:
    plan = plan_layout(LISTS, Layout.UNION, CompileSettings())
    assert plan.allowed - INVARIANT_NAMES == BOOTING | RUNNING | SHUTDOWN


@pytest.mark.parametrize("invariant", ["exit", "exit_group", "rt_sigreturn", "restart_syscall", "clone3_enosys"])
def test_invariant_switches_off_alone(invariant: str) -> None:
    enabled = tuple(name for name in ("exit", "exit_group", "rt_sigreturn", "restart_syscall", "clone3_enosys") if name != invariant)
    plan = phase_plan(LISTS, Phase.RUNNING, CompileSettings(invariants=enabled))
    actions = syscall_actions(parse_program(compile_plan(plan).bpf))["x86_64"]
    switched = "clone3" if invariant == "clone3_enosys" else invariant
    assert actions[switched] == KILL_PROCESS
    for name, action in INVARIANT_ACTIONS.items():
        if name != switched:
            assert actions[name] == action, name
    assert switched not in plan.invariants


def test_listed_syscall_beats_invariant() -> None:
    lists = {"x86_64": {phase: frozenset({"read", "clone3"}) for phase in PHASES}}
    plan = phase_plan(lists, Phase.RUNNING, CompileSettings())
    assert plan.action("x86_64", "clone3") == ALLOW
    # Only x86_64 lists clone3, so the invariant still sets it on the other arches.
    assert plan.action("x86", "clone3") == ENOSYS
    assert plan.action("x32", "clone3") == ENOSYS


def test_x86_and_x32_lists_kept_apart() -> None:
    lists = {
        "x86_64": {phase: frozenset({"read", "write"}) for phase in PHASES},
        "x86": {phase: frozenset({"read", "mmap2", "socket"}) for phase in PHASES},
    }
    program = parse_program(compile_plan(phase_plan(lists, Phase.RUNNING, CompileSettings())).bpf)
    x86 = syscall_table("x86")
    assert action_for(program, "x86", x86.number("mmap2")) == ALLOW
    assert action_for(program, "x86", x86.number("write")) == KILL_PROCESS
    assert action_for(program, "x86", x86.number("socket")) == ALLOW
    # libseccomp also allows socket(2) through socketcall(SYS_SOCKET = 1) on x86.
    assert action_for(program, "x86", x86.number("socketcall"), args=(1,)) == ALLOW
    assert action_for(program, "x86", x86.number("socketcall"), args=(2,)) == KILL_PROCESS
    assert action_for(program, "x86_64", syscall_table("x86_64").number("read")) == ALLOW
    assert action_for(program, "x32", X32_SYSCALL_BIT | 0) == KILL_PROCESS


def test_shared_arch_lists_apply_everywhere() -> None:
    settings = CompileSettings(arch_lists="shared")
    program = parse_program(compile_plan(phase_plan(LISTS, Phase.RUNNING, settings)).bpf)
    for arch in ("x86_64", "x86", "x32"):
        assert action_for(program, arch, syscall_table(arch).number("epoll_wait")) == ALLOW, arch


def test_uncovered_arch_gets_default_action() -> None:
    settings = CompileSettings(arches=("x86_64",), default_action=Action(ActionKind.ERRNO, errno.EPERM))
    program = parse_program(compile_plan(phase_plan(LISTS, Phase.RUNNING, settings)).bpf)
    assert action_for(program, "x86", 3) == Action(ActionKind.ERRNO, errno.EPERM)
    assert action_for(program, "x32", X32_SYSCALL_BIT) == Action(ActionKind.ERRNO, errno.EPERM)


def test_binary_tree_and_linear_agree() -> None:
    plan = notify_plan(load_profile(DATA / "profiles" / "redis-1").lists(), CompileSettings())
    tree = syscall_actions(parse_program(compile_plan(plan, binary_tree=True).bpf))
    linear = syscall_actions(parse_program(compile_plan(plan, binary_tree=False).bpf))
    assert tree == linear


def test_unknown_syscall_named() -> None:
    lists = {"x86_64": {phase: frozenset({"read", "opne"}) for phase in PHASES}}
    with pytest.raises(UnknownSyscall, match="'opne'.*did you mean 'open'"):
        phase_plan(lists, Phase.RUNNING, CompileSettings())
    wrong_arch = {"x86_64": {phase: frozenset({"mmap2"}) for phase in PHASES}}
    with pytest.raises(UnknownSyscall, match="does not exist on x86_64"):
        phase_plan(wrong_arch, Phase.RUNNING, CompileSettings())


def test_empty_phase_raises_or_skips() -> None:
    lists = {"x86_64": {Phase.BOOTING: BOOTING, Phase.RUNNING: RUNNING, Phase.SHUTDOWN: frozenset()}}
    with pytest.raises(EmptyPhase, match="shutdown"):
        compile_profile(lists, CompileSettings(), [Layout.PHASE])
    result = compile_profile(lists, CompileSettings(), [Layout.PHASE, Layout.NOTIFY], skip_empty=True)
    assert [program.plan.phase for program in result.programs] == [Phase.BOOTING, Phase.RUNNING]
    assert len(result.skipped) == 2


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="unknown safety invariant 'exit_grup'"):
        CompileSettings(invariants=("exit_grup",))
    with pytest.raises(ValueError, match="meaningless"):
        CompileSettings(default_action=ALLOW)
    with pytest.raises(ValueError, match="outside 1..4095"):
        Action.parse("errno:5000")
    with pytest.raises(ValueError, match="unknown errno name"):
        Action.parse("errno:ENOPE")


def test_filter_event_carries_invariants() -> None:
    result = compile_profile(LISTS, CompileSettings(default_action=Action(ActionKind.ERRNO, errno.EPERM)))
    events = [filter_event(program, "abc") for program in result.programs]
    assert [(event.layout, event.phase) for event in events] == [
        ("phase", Phase.BOOTING),
        ("phase", Phase.RUNNING),
        ("phase", Phase.SHUTDOWN),
        ("union", None),
        ("notify", None),
        ("notify-exact", None),
    ]
    running = events[1]
    assert running.default_action == "errno:EPERM"
    assert running.invariants == {
        "clone3": "errno:ENOSYS",
        "exit": "allow",
        "exit_group": "allow",
        "restart_syscall": "allow",
        "rt_sigreturn": "allow",
        "sigreturn": "allow",
    }
    assert running.phase_lists[Phase.BOOTING] == BOOTING
    assert running.arches == ("x86_64", "x86", "x32")
    assert running.bpf == compile_plan(phase_plan(LISTS, Phase.RUNNING, CompileSettings(default_action=Action(ActionKind.ERRNO, 1)))).bpf


def test_interpreter_rejects_bad_programs() -> None:
    with pytest.raises(BpfError, match="multiple of 8"):
        parse_program(b"\x06\x00\x00\x00")
    # ld [64] reads past the end of seccomp_data.
    out_of_range = parse_program(bytes.fromhex("2000000040000000") + bytes.fromhex("0600000000007fff"))
    with pytest.raises(BpfError, match="outside seccomp_data"):
        action_for(out_of_range, "x86_64", 0)
    jump_out = parse_program(bytes.fromhex("0500000005000000") + bytes.fromhex("0600000000007fff"))
    with pytest.raises(BpfError, match="leaves the program"):
        check_program(jump_out)
    # BPF_ALU | BPF_MOD | BPF_K: valid classic BPF, but not in a seccomp filter.
    modulo = parse_program(bytes.fromhex("9400000003000000") + bytes.fromhex("0600000000007fff"))
    with pytest.raises(BpfError, match="not allowed in a seccomp filter"):
        check_program(modulo)
    with pytest.raises(BpfError, match="not allowed in a seccomp filter"):
        action_for(modulo, "x86_64", 0)
