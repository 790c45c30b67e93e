"""The audit rule that records stop signals, and a lease that loads it for as long as any trace needs it.

``docker stop`` makes runc call kill(2) on the container's init process
(checked with an audit rule on this host: Docker 20.10, containerd's
runc v2 shim, runc 1.1.5 sent ``kill(PID, SIGTERM)``). The kernel's audit
time of that call is the exact start of the shutdown, while Docker logs its
kill event some milliseconds later. So while a trace runs, the kernel gets two
syscall exit rules with the filter key ``speaker-stop-signal``, as
``auditctl`` would write them::

    -A exit,always -F arch=b64 -S kill,tkill,pidfd_send_signal -F a1!=0 -F a1!=23 -k speaker-stop-signal
    -A exit,always -F arch=b64 -S tgkill -F a2!=0 -F a2!=23 -k speaker-stop-signal

Signal 0 only checks that a process exists, and the Go runtime of dockerd,
containerd and runc sends SIGURG (23) to its own threads many times a
second, so the rules leave both out. The rules are put first in the exit
list (``-A``), so that no rule of someone else's can end the search before
them. They do not add syscall records to the SECCOMP records of traced
containers: on this host those stayed single records with a serial of their
own while the rules were loaded. But any loaded syscall rule makes the
kernel keep a full audit context for every syscall of every task, which
made getppid about 0.3 to 0.6 µs and stat about 1 µs slower on a 2-core
test VM.

The rules are global. Each trace that wants them takes a lease in
/run/speaker/audit-signal-rule.json: the first lease loads them, the last
one deletes them, and copies that a trace which died left loaded are
replaced.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

from speaker.audit.leases import DEFAULT_STATE_DIR, LeaseRegistry
from speaker.audit.netlink import AuditRequestError, add_rule, delete_rule
from speaker.audit.records import AUDIT_ARCH_X86_64
from speaker.audit.signals import KILL, PIDFD_SEND_SIGNAL, RULE_KEY, TGKILL, TKILL

# Constants of include/uapi/linux/audit.h.
AUDIT_FILTER_EXIT = 0x04
AUDIT_FILTER_PREPEND = 0x10
AUDIT_ALWAYS = 2
AUDIT_ARCH = 11
AUDIT_ARG1 = 201
AUDIT_ARG2 = 202
AUDIT_FILTERKEY = 210
AUDIT_EQUAL = 0x40000000
AUDIT_NOT_EQUAL = 0x30000000
AUDIT_BITMASK_SIZE = 64
AUDIT_MAX_FIELDS = 64
#: SIGURG, which Go programs send to their own threads to preempt goroutines.
SIGURG = 23

_REGISTRY_NAME = "audit-signal-rule"
#: Copies of a rule deleted at most, in case traces that died left several.
_MAX_COPIES = 16


def rule_data(syscalls: tuple[int, ...], signal_argument: int, *, prepend: bool) -> bytes:
    """Return the ``struct audit_rule_data`` of one rule for x86_64 ``syscalls``.

    ``signal_argument`` is the field of the argument that contains the signal
    (AUDIT_ARG1 or AUDIT_ARG2); the rule leaves out signals 0 and SIGURG.
    Add the rule with ``prepend``; delete it without, because the kernel
    clears that flag when it stores a rule and compares flags on deletion.
    """
    mask = [0] * AUDIT_BITMASK_SIZE
    for nr in syscalls:
        mask[nr // 32] |= 1 << (nr % 32)
    key = RULE_KEY.encode()
    conditions = [
        (AUDIT_ARCH, AUDIT_EQUAL, AUDIT_ARCH_X86_64),
        (signal_argument, AUDIT_NOT_EQUAL, 0),
        (signal_argument, AUDIT_NOT_EQUAL, SIGURG),
        (AUDIT_FILTERKEY, AUDIT_EQUAL, len(key)),
    ]
    fields = [field for field, _, _ in conditions] + [0] * (AUDIT_MAX_FIELDS - len(conditions))
    operators = [operator for _, operator, _ in conditions] + [0] * (AUDIT_MAX_FIELDS - len(conditions))
    values = [value for _, _, value in conditions] + [0] * (AUDIT_MAX_FIELDS - len(conditions))
    flags = AUDIT_FILTER_EXIT | (AUDIT_FILTER_PREPEND if prepend else 0)
    header = struct.pack("=III", flags, AUDIT_ALWAYS, len(conditions))
    body = struct.pack(f"={AUDIT_BITMASK_SIZE}I", *mask)
    body += struct.pack(f"={AUDIT_MAX_FIELDS}I", *fields)
    body += struct.pack(f"={AUDIT_MAX_FIELDS}I", *values)
    body += struct.pack(f"={AUDIT_MAX_FIELDS}I", *operators)
    return header + body + struct.pack("=I", len(key)) + key


#: The syscalls of each rule and the argument that contains the signal: the
#: second argument of kill, tkill and pidfd_send_signal, the third of tgkill.
# TODO: the rules cover x86_64 callers only, so a stop signal that an i386
# program sends starts the shutdown at Docker's later kill event.
_RULES = (((KILL, TKILL, PIDFD_SEND_SIGNAL), AUDIT_ARG1), ((TGKILL,), AUDIT_ARG2))


class SignalRuleLease:
    """One trace's hold on the stop signal rules. Methods raise AuditRequestError (EPERM without CAP_AUDIT_CONTROL)."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.registry = LeaseRegistry(_REGISTRY_NAME, state_dir)
        self.active = False

    def acquire(self) -> int:
        """Load the rules unless another lease holds them; return the number of other live leases."""
        registry = self.registry
        with registry.locked():
            holders = registry.live_holders(registry.load())
            if not holders:
                for syscalls, argument in _RULES:
                    # A copy left by a trace that died is deleted first, because
                    # the kernel would not see it as the same rule as a prepended one.
                    _delete_all(syscalls, argument)
                    add_rule(rule_data(syscalls, argument, prepend=True))
            holders.append(registry.holder)
            registry.save({"holders": holders})
            self.active = True
            return len(holders) - 1

    def release(self) -> int:
        """Drop this lease; the last one deletes the rules. Return the number of other live leases."""
        registry = self.registry
        with registry.locked():
            holders = registry.live_holders(registry.load(), without_self=True)
            self.active = False
            if holders:
                registry.save({"holders": holders})
                return len(holders)
            for syscalls, argument in _RULES:
                _delete_all(syscalls, argument)
            registry.remove()
            return 0


def _delete_all(syscalls: tuple[int, ...], argument: int) -> None:
    """Delete every loaded copy of one rule."""
    rule = rule_data(syscalls, argument, prepend=False)
    for _ in range(_MAX_COPIES):
        try:
            delete_rule(rule)
        except AuditRequestError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
