"""Options that the two audit sources, ``audit_log`` and ``audit_netlink``, share.

Both read the same SECCOMP records and lease the same kernel settings, so
their shared options have one definition, and ``--set`` keys stay the same
when a pipeline switches from one source to the other.
"""

from __future__ import annotations

import dataclasses

from speaker.options import Duration, option


@dataclasses.dataclass(frozen=True)
class AuditSourceOptions:
    adjust_kernel: bool = option(
        True,
        help="Raise the kernel's audit backlog and lift its rate limit for the trace, restoring both afterwards "
        "(needs CAP_AUDIT_CONTROL).",
    )
    backlog_limit: int = option(
        8192, min=64, help="Audit backlog, in records, while tracing; a larger current value is kept."
    )
    stop_signals: bool = option(
        True,
        help="Load an audit rule that records kill, tkill, tgkill and pidfd_send_signal calls (except signal 0 "
        "and SIGURG) while tracing, and emit a SignalRecord for each, so that the shutdown starts at the "
        "kernel time of the stop signal instead of Docker's later kill event (needs CAP_AUDIT_CONTROL, and "
        "enables audit if it is disabled and adjust_kernel is true). While loaded, the rule makes every "
        "syscall on the host slower, by about 0.3 to 1 µs on a 2-core test VM.",
    )
    gap_grace: Duration = option(
        Duration.parse("2s"),
        help="Time a missing serial number may stay missing (records can arrive out of order) before it counts as lost.",
    )
    lost_check_interval: Duration = option(
        Duration.parse("1s"), min=0.1, help="Time between two reads of the kernel's lost-record counter."
    )
    records: bool = option(
        False,
        help="Also emit one SyscallRecord per record, with comm, exe and serial. Parsing is about ten times slower.",
    )
