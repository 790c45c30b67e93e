"""Architectures, and syscall names and numbers from the installed libseccomp.

SPEAKER names architectures the way libseccomp does (``x86_64``, ``x86``,
``x32``). An x86_64 kernel runs code of all three, so a filter for an x86_64
host covers all three: 64-bit code, 32-bit code entering through ``int 0x80``
(the i386 compat ABI) and x32 code (x86_64 syscall numbers with bit 30 set).
"""

from __future__ import annotations

import ctypes
import difflib
import functools
from collections.abc import Iterable, Mapping

import pyseccomp

#: libseccomp's SCMP_ARCH_* tokens, which pyseccomp's calls take.
ARCH_TOKENS: Mapping[str, int] = {
    "x86_64": pyseccomp.Arch.X86_64,
    "x86": pyseccomp.Arch.X86,
    "x32": pyseccomp.Arch.X32,
}
#: AUDIT_ARCH_* values that the kernel puts in ``seccomp_data.arch``. x32
#: code reports x86_64's value and is distinguished by X32_SYSCALL_BIT in the number.
KERNEL_ARCH_TOKENS: Mapping[str, int] = {
    "x86_64": 0xC000003E,
    "x86": 0x40000003,
    "x32": 0xC000003E,
}
X32_SYSCALL_BIT = 0x40000000

#: libseccomp architecture names by the SCMP_ARCH_* constants that Docker, OCI
#: and the Security Profiles Operator write.
SCMP_ARCH_NAMES: Mapping[str, str] = {
    "SCMP_ARCH_X86_64": "x86_64",
    "SCMP_ARCH_X86": "x86",
    "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm",
    "SCMP_ARCH_AARCH64": "aarch64",
    "SCMP_ARCH_MIPS": "mips",
    "SCMP_ARCH_MIPS64": "mips64",
    "SCMP_ARCH_MIPS64N32": "mips64n32",
    "SCMP_ARCH_MIPSEL": "mipsel",
    "SCMP_ARCH_MIPSEL64": "mipsel64",
    "SCMP_ARCH_MIPSEL64N32": "mipsel64n32",
    "SCMP_ARCH_PPC": "ppc",
    "SCMP_ARCH_PPC64": "ppc64",
    "SCMP_ARCH_PPC64LE": "ppc64le",
    "SCMP_ARCH_S390": "s390",
    "SCMP_ARCH_S390X": "s390x",
    "SCMP_ARCH_PARISC": "parisc",
    "SCMP_ARCH_PARISC64": "parisc64",
    "SCMP_ARCH_RISCV64": "riscv64",
}
SCMP_ARCH_CONSTANTS: Mapping[str, str] = {name: constant for constant, name in SCMP_ARCH_NAMES.items()}

#: Every architecture name libseccomp has, for telling "foreign" from "invalid".
KNOWN_ARCHES: frozenset[str] = frozenset(SCMP_ARCH_NAMES.values())

# Highest syscall number (without the x32 bit) probed when building a table.
# Linux 6.18 on x86 uses numbers below 470, and x32's special range ends at 547.
_MAX_SYSCALL_NR = 1024


class UnknownSyscall(ValueError):
    """A syscall name that libseccomp does not know on an architecture.

    ``other_arches`` lists the architectures that do have the name, and
    ``suggestion`` is the closest known name, or empty.
    """

    def __init__(self, name: str, arch: str, other_arches: tuple[str, ...], suggestion: str) -> None:
        self.name = name
        self.arch = arch
        self.other_arches = other_arches
        self.suggestion = suggestion
        if other_arches:
            message = f"syscall {name!r} does not exist on {arch} (only on {', '.join(other_arches)})"
        else:
            hint = f"; did you mean {suggestion!r}?" if suggestion else ""
            message = f"unknown syscall name {name!r}: libseccomp {libseccomp_version()} does not know it{hint}"
        super().__init__(message)


class UnsupportedArch(ValueError):
    """An architecture that this host cannot enforce a filter for."""


class SyscallTable:
    """The syscall names and numbers of one architecture, read from libseccomp."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        token = ARCH_TOKENS[arch]
        offset = X32_SYSCALL_BIT if arch == "x32" else 0
        numbers: dict[str, int] = {}
        names: dict[int, str] = {}
        for base in range(_MAX_SYSCALL_NR):
            nr = base | offset
            try:
                name = pyseccomp.resolve_syscall(token, nr).decode()
            except ValueError:
                continue
            # On x86, libseccomp resolves the socket and IPC names to negative
            # pseudo numbers, because it multiplexes them through socketcall
            # and ipc as well. The direct number is still the real one.
            resolved = pyseccomp.resolve_syscall(token, name)
            if resolved != nr and resolved >= 0:
                continue
            numbers[name] = nr
            names[nr] = name
        self.numbers: Mapping[str, int] = numbers
        self.names: Mapping[int, str] = names

    def number(self, name: str) -> int | None:
        """Return the syscall number of ``name``, or None if the arch lacks it."""
        return self.numbers.get(name)

    def name(self, nr: int) -> str | None:
        """Return the name of syscall ``nr``, or None if libseccomp does not know it."""
        return self.names.get(nr)


@functools.cache
def syscall_table(arch: str) -> SyscallTable:
    """Return the cached syscall table of ``arch`` (``x86_64``, ``x86`` or ``x32``)."""
    if arch not in ARCH_TOKENS:
        raise UnsupportedArch(f"no syscall table for {arch!r}: SPEAKER supports {', '.join(ARCH_TOKENS)}")
    return SyscallTable(arch)


@functools.cache
def host_arches() -> tuple[str, ...]:
    """Return the architectures a filter on this host covers: the native one first, then its compat ones.

    Raises UnsupportedArch on a host that is not x86_64.
    """
    native = pyseccomp.system_arch()
    if native == pyseccomp.Arch.X86_64:
        return ("x86_64", "x86", "x32")
    name = next((name for name, token in ARCH_TOKENS.items() if token == native), f"token {native:#x}")
    raise UnsupportedArch(f"this host's architecture ({name}) is not supported: SPEAKER compiles filters for x86_64 hosts")


@functools.cache
def all_syscall_names() -> frozenset[str]:
    """Return every name known on any supported architecture."""
    names: set[str] = set()
    for arch in ARCH_TOKENS:
        names.update(syscall_table(arch).numbers)
    return frozenset(names)


def check_syscall(arch: str, name: str) -> int:
    """Return the number of ``name`` on ``arch``, or raise UnknownSyscall naming the closest match."""
    nr = syscall_table(arch).number(name)
    if nr is not None:
        return nr
    others = tuple(other for other in ARCH_TOKENS if other != arch and syscall_table(other).number(name) is not None)
    suggestion = ""
    if not others:
        close = difflib.get_close_matches(name, sorted(syscall_table(arch).numbers), n=1)
        suggestion = close[0] if close else ""
    raise UnknownSyscall(name, arch, others, suggestion)


def home_arch(name: str, arches: Iterable[str] | None = None) -> str | None:
    """Return the first of ``arches`` (default: the host's, native first) that has syscall ``name``."""
    for arch in arches if arches is not None else host_arches():
        if syscall_table(arch).number(name) is not None:
            return arch
    return None


@functools.cache
def libseccomp_version() -> str:
    """Return the installed libseccomp's version, such as ``2.5.4``."""

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    function = pyseccomp._libseccomp.seccomp_version
    function.restype = ctypes.POINTER(_Version)
    function.argtypes = ()
    version = function().contents
    return f"{version.major}.{version.minor}.{version.micro}"
