"""Syscall names and numbers per architecture, from libseccomp's tables.

Architectures use libseccomp's names: ``x86_64``, ``x86`` (i386 programs on
an x86_64 kernel) and ``x32``. An x32 syscall number keeps the x32 bit
(``0x40000000``), as the kernel reports it in audit records and
``seccomp_data``, and libseccomp resolves x32 numbers in that form.

Lookups go through libseccomp once per (arch, number) and are cached, because
a trace repeats the same few hundred keys millions of times.
"""

from __future__ import annotations

import functools

import pyseccomp

#: libseccomp architecture tokens by libseccomp's architecture name.
ARCH_TOKENS: dict[str, int] = {
    "x86_64": pyseccomp.Arch.X86_64,
    "x86": pyseccomp.Arch.X86,
    "x32": pyseccomp.Arch.X32,
}
ARCHES: tuple[str, ...] = tuple(ARCH_TOKENS)

#: Bit that marks an x32 syscall number (``__X32_SYSCALL_BIT`` in the kernel).
X32_SYSCALL_BIT = 0x40000000

#: Audit ``arch`` field values (``AUDIT_ARCH_*`` from linux/audit.h).
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003

#: Prefix of the placeholder name for a number that libseccomp does not know.
UNKNOWN_PREFIX = "unknown:"


class UnknownSyscall(ValueError):
    """A syscall name or number that libseccomp has no entry for on the given arch."""


def arch_token(arch: str) -> int:
    """Return libseccomp's token for ``arch``. Raises ValueError naming the supported arches."""
    try:
        return ARCH_TOKENS[arch]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch!r}: expected one of {', '.join(ARCHES)}") from None


def arch_from_audit(audit_arch: int, nr: int) -> str:
    """Return the libseccomp arch name of an audit record's ``arch`` field and syscall number.

    The x86_64 audit arch covers both x86_64 and x32 programs, and only the
    x32 bit of the syscall number distinguishes them. Raises ValueError for other arches.
    """
    if audit_arch == AUDIT_ARCH_X86_64:
        return "x32" if nr & X32_SYSCALL_BIT else "x86_64"
    if audit_arch == AUDIT_ARCH_I386:
        return "x86"
    raise ValueError(f"unsupported audit arch {audit_arch:#x}: expected c000003e (x86_64) or 40000003 (i386)")


@functools.cache
def resolve_name(arch: str, nr: int) -> str:
    """Return the name of syscall ``nr`` on ``arch``. Raises UnknownSyscall."""
    token = arch_token(arch)
    if arch == "x32" and not nr & X32_SYSCALL_BIT:
        # libseccomp also maps x32 numbers without the bit, but the kernel never
        # reports them that way, so such a number is a bug upstream.
        raise UnknownSyscall(f"x32 syscall number {nr} lacks the x32 bit {X32_SYSCALL_BIT:#x}")
    try:
        return pyseccomp.resolve_syscall(token, nr).decode("ascii")
    except ValueError:
        raise UnknownSyscall(f"libseccomp has no {arch} syscall number {nr}") from None


@functools.cache
def syscall_name(arch: str, nr: int) -> str:
    """Return the name of syscall ``nr`` on ``arch``, or a placeholder for an unknown number.

    The placeholder is ``unknown:ARCH:NR``. Syscall names contain no colon, so
    it cannot collide with a real name, and a profile writer can recognize it
    by ``UNKNOWN_PREFIX``. Unknown numbers
    appear when the kernel is newer than libseccomp's tables, and for every
    number of an arch outside ``ARCHES``.
    """
    try:
        return resolve_name(arch, nr)
    except ValueError:  # UnknownSyscall, or an unsupported arch
        return f"{UNKNOWN_PREFIX}{arch}:{nr}"


@functools.cache
def syscall_number(arch: str, name: str) -> int:
    """Return the number of syscall ``name`` on ``arch``. Raises UnknownSyscall.

    libseccomp returns -1 for an unknown name and other negative pseudo-numbers
    for syscalls that it multiplexes (with libseccomp 2.5.4, ``socket`` on x86
    resolves to -101 through ``socketcall``). Both raise here.
    """
    number = pyseccomp.resolve_syscall(arch_token(arch), name)
    if number < 0:
        raise UnknownSyscall(f"{name!r} is not a syscall on {arch}")
    return number


def is_unknown(name: str) -> bool:
    """Return whether ``name`` is the placeholder for a number libseccomp does not know."""
    return name.startswith(UNKNOWN_PREFIX)
