"""Syscall names per architecture, from libseccomp's tables."""

from __future__ import annotations

import pytest

from speaker.syscalls import UnknownSyscall, arch_from_audit, is_unknown, resolve_name, syscall_name, syscall_number


@pytest.mark.parametrize(
    ("arch", "nr", "name"),
    [
        ("x86_64", 0, "read"),
        ("x86_64", 59, "execve"),
        ("x86", 3, "read"),  # i386 numbers differ from x86_64's
        ("x86", 11, "execve"),
        ("x32", 0x40000000, "read"),  # x32 numbers keep the x32 bit
        ("x32", 0x40000000 + 520, "execve"),  # x32's own execve entry
    ],
)
def test_names_per_arch(arch, nr, name):
    assert syscall_name(arch, nr) == name


def test_unknown_number_gets_placeholder():
    # x86_64 has no syscall 335: the numbers between 334 and 424 are unused.
    assert syscall_name("x86_64", 335) == "unknown:x86_64:335"
    assert is_unknown(syscall_name("x86_64", 335))
    assert syscall_name("aarch64", 63) == "unknown:aarch64:63"
    with pytest.raises(UnknownSyscall):
        resolve_name("x86_64", 335)


def test_x32_number_without_bit_is_rejected():
    with pytest.raises(UnknownSyscall, match="lacks the x32 bit"):
        resolve_name("x32", 0)


def test_numbers_by_name():
    assert syscall_number("x86_64", "openat") == 257
    assert syscall_number("x86", "openat") == 295
    with pytest.raises(UnknownSyscall):
        syscall_number("x86_64", "no_such_syscall")


def test_arch_from_audit_field():
    assert arch_from_audit(0xC000003E, 59) == "x86_64"
    assert arch_from_audit(0xC000003E, 0x40000000 + 59) == "x32"
    assert arch_from_audit(0x40000003, 11) == "x86"
    with pytest.raises(ValueError, match="unsupported audit arch"):
        arch_from_audit(0xC00000B7, 1)
