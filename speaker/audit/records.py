"""Audit record types, architecture names and the fields of SECCOMP records.

The kernel formats a type=SECCOMP (1326) record as (kernel/auditsc.c,
``audit_seccomp``)::

    audit(1796414751.880:17): auid=4294967295 uid=0 gid=0 ses=4294967295
    [subj=LABEL ]pid=29166 comm="runc:[2:INIT]" exe="/" sig=0 arch=c000003e
    syscall=257 compat=0 ip=0x40828e code=0x7ffc0000

``audit(SECONDS.MILLISECONDS:SERIAL)`` is the record's time and serial
number. ``comm`` and ``exe`` are quoted, or hex-encoded when they contain a
space, a quote or a control character, so no field value contains a space
except ``subj`` (AppArmor labels such as ``docker-default (enforce)``).
auditd writes the same text behind ``type=SECCOMP msg=`` in audit.log, and in
its ENRICHED format appends a 0x1d byte and interpreted fields to the line.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: Record type of a seccomp action that was logged.
AUDIT_SECCOMP = 1326

#: ``code=`` of a SCMP_ACT_LOG action (SECCOMP_RET_LOG).
SECCOMP_RET_LOG = 0x7FFC0000

#: AUDIT_ARCH_* values (include/uapi/linux/audit.h) by libseccomp's arch name.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
#: An x86_64 syscall number with this bit set is an x32 syscall.
X32_SYSCALL_BIT = 0x40000000

_ARCH_NAMES = {
    AUDIT_ARCH_X86_64: "x86_64",
    AUDIT_ARCH_I386: "x86",
    0xC00000B7: "aarch64",
    0x40000028: "arm",
    0xC0000015: "ppc64le",
    0x80000016: "s390x",
    0xC00000F3: "riscv64",
}


#: Pids are below PID_MAX_LIMIT, which is 4 * 1024 * 1024 on 64-bit kernels
#: (include/linux/threads.h).
PID_LIMIT = 4 * 1024 * 1024
#: Syscall numbers of x86_64, x86 and x32 (without the x32 bit) are below
#: this. The Linux 6.1 headers end at 450 for x86_64, and x32's own range
#: ends at 547, so the limit leaves room for newer syscalls.
SYSCALL_LIMIT = 1024
#: Architectures that SPEAKER's profiles cover, by their AUDIT_ARCH_* value.
_SUPPORTED_ARCHES = {AUDIT_ARCH_X86_64, AUDIT_ARCH_I386}


def supported_arch(audit_arch: int, nr: int) -> str | None:
    """Return libseccomp's arch name for a syscall that a profile can list, or None.

    None means that the arch is not x86_64 or x86, or that the number is
    outside 0 to SYSCALL_LIMIT - 1 (with the x32 bit for x32). The kernel
    runs the seccomp filter before it checks the number, so a program that
    calls an unused number (syscall(4000)) gets a record with that number.
    """
    if audit_arch not in _SUPPORTED_ARCHES:
        return None
    index = nr & ~X32_SYSCALL_BIT if audit_arch == AUDIT_ARCH_X86_64 else nr
    if not 0 <= index < SYSCALL_LIMIT:
        return None
    return arch_name(audit_arch, nr)


def arch_name(audit_arch: int, nr: int) -> str:
    """Return libseccomp's name for the architecture of one syscall.

    ``audit_arch`` is the record's ``arch=`` value. An x86_64 syscall whose
    number has bit 30 set was made through the x32 ABI. An architecture
    without a libseccomp name is returned as ``audit:`` and its hex value.
    """
    if audit_arch == AUDIT_ARCH_X86_64 and nr >= 0 and nr & X32_SYSCALL_BIT:
        return "x32"
    return _ARCH_NAMES.get(audit_arch) or f"audit:{audit_arch:x}"


def decode_value(raw: bytes) -> str:
    """Decode a ``comm=`` or ``exe=`` value: quoted text, hex-encoded text or ``(null)``."""
    if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
        return raw[1:-1].decode("utf-8", "replace")
    if raw == b"(null)":
        return ""
    try:
        return bytes.fromhex(raw.decode("ascii")).decode("utf-8", "replace")
    except ValueError:
        return raw.decode("utf-8", "replace")


#: A quoted, hex-encoded or null ``comm=`` or ``exe=`` value.
_VALUE = rb'(?:"[^"\n]*"|[0-9A-F]+|\(null\))'

#: The start of every audit.log line: its type, time and serial number.
LINE_HEADER = re.compile(rb"type=([^ \n]+) msg=audit\((\d+\.\d+):(\d+)\): ")

#: The fields of a SECCOMP record after its header. The syscall number must
#: be followed by a space, so that a line cut inside the number is rejected.
SECCOMP_FIELDS = re.compile(
    rb"auid=\d+ uid=\d+ gid=\d+ ses=\d+ (?:subj=[^\n]*? )?pid=(\d+) comm=(" + _VALUE + rb") exe=(" + _VALUE
    + rb") sig=-?\d+ arch=([0-9a-f]{1,8}) syscall=(-?\d+) (?:[^\n]*?code=0x([0-9a-f]{1,8}))?"
)

#: The counting key of a SECCOMP record as the chunk parser captures it,
#: from the pid to the syscall number.
KEY_FIELDS = re.compile(
    rb"(\d+) comm=(" + _VALUE + rb") exe=(" + _VALUE + rb") sig=-?\d+ arch=([0-9a-f]{1,8}) syscall=(-?\d+)"
)


class SeccompRecord(NamedTuple):
    """The fields of one parsed SECCOMP record."""

    time: float
    serial: int
    pid: int
    comm: str
    exe: str
    arch: str
    nr: int
    #: Seccomp action code, such as SECCOMP_RET_LOG; 0 when the line ends before ``code=``.
    action: int


def is_daemon_type(type_name: bytes) -> bool:
    """Return whether an audit.log type name is one of auditd's own records (DAEMON_START and so on).

    auditd numbers these from its own counter, not the kernel's serial numbers.
    """
    return type_name.startswith(b"DAEMON_")
