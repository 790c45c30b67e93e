"""The per-phase decision sets, checked against libseccomp's syscall numbers."""

from __future__ import annotations

import pytest

from speaker.events import Phase
from speaker.notify.ioctl import AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, arch_name
from speaker.notify.policy import PhasePolicy, syscall_name

LISTS = {
    Phase.BOOTING: {"mount", "read"},
    Phase.RUNNING: {"read", "write"},
    Phase.SHUTDOWN: {"unlink", "read"},
}
# x86_64 numbers from the kernel's syscall_64.tbl.
READ, WRITE, MOUNT, UNLINK = 0, 1, 165, 87


def allows(policy: PhasePolicy, phase: Phase, nr: int, audit_arch: int = AUDIT_ARCH_X86_64) -> bool:
    return policy.allows(phase, audit_arch, nr)


def test_default_layout_adds_running_to_other_phases() -> None:
    policy = PhasePolicy.for_arches(LISTS)
    assert allows(policy, Phase.BOOTING, MOUNT)
    assert allows(policy, Phase.BOOTING, WRITE)
    assert not allows(policy, Phase.BOOTING, UNLINK)
    assert allows(policy, Phase.RUNNING, WRITE)
    assert not allows(policy, Phase.RUNNING, MOUNT)
    assert not allows(policy, Phase.RUNNING, UNLINK)
    assert allows(policy, Phase.SHUTDOWN, UNLINK)
    assert allows(policy, Phase.SHUTDOWN, WRITE)
    assert not allows(policy, Phase.SHUTDOWN, MOUNT)


def test_exact_layout_keeps_each_list() -> None:
    policy = PhasePolicy.for_arches(LISTS, exact=True)
    assert not allows(policy, Phase.BOOTING, WRITE)
    assert allows(policy, Phase.BOOTING, MOUNT)
    assert not allows(policy, Phase.SHUTDOWN, WRITE)
    assert allows(policy, Phase.RUNNING, WRITE)


def test_arches_have_their_own_numbers() -> None:
    policy = PhasePolicy.for_arches(LISTS, arches=("x86_64", "x86", "x32"))
    # mount is 21 on i386 and 165 | 0x40000000 on x32 (syscall_32.tbl, syscall_64.tbl).
    assert allows(policy, Phase.BOOTING, 21, AUDIT_ARCH_I386)
    assert not allows(policy, Phase.RUNNING, 21, AUDIT_ARCH_I386)
    assert allows(policy, Phase.BOOTING, MOUNT | X32_SYSCALL_BIT)
    # Number 21 on x86_64 is access, which no list names.
    assert not allows(policy, Phase.BOOTING, 21)


def test_arch_without_lists_allows_nothing() -> None:
    policy = PhasePolicy({"x86_64": LISTS})
    assert not allows(policy, Phase.BOOTING, 21, AUDIT_ARCH_I386)


def test_missing_phase_rejected() -> None:
    with pytest.raises(ValueError, match="no shutdown list"):
        PhasePolicy.for_arches({Phase.BOOTING: {"read"}, Phase.RUNNING: {"read"}})


def test_unknown_arch_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported arch 'arm'"):
        PhasePolicy({"arm": LISTS})


def test_names_and_arches_of_notifications() -> None:
    assert arch_name(AUDIT_ARCH_X86_64, MOUNT) == "x86_64"
    assert arch_name(AUDIT_ARCH_X86_64, MOUNT | X32_SYSCALL_BIT) == "x32"
    assert arch_name(AUDIT_ARCH_I386, 21) == "x86"
    assert syscall_name("x86_64", MOUNT) == "mount"
    assert syscall_name("x86", 21) == "mount"
    assert syscall_name("x86_64", 9999) == "nr9999"
