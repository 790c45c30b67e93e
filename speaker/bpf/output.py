"""Parse the JSON lines that bpftrace prints for ``syscall_counts.bt``.

bpftrace 0.17 with ``-f json`` prints one object per line, and its ``type``
is one of:

* ``attached_probes``, once the probes are attached;
* ``printf``, the program's own lines ``cgroup ID PATH``, ``flush PERIOD NSECS``
  and ``signal SIG PID CODE NSECS SENDER_PID SENDER_COMM``;
* ``map``, a printed map with its keys joined by commas;
* ``cat``, the program's read of /proc/uptime after each clear;
* ``helper_error``, a failed map update under ``-k``;
* ``lost_events``, output events dropped because the perf buffer was full.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from speaker.syscalls import X32_SYSCALL_BIT

#: Bit of the ``call`` key that marks a syscall made through an i386 entry point.
I386_FLAG = 1 << 32
_NUMBER_MASK = 0xFFFFFFFF


class OutputError(ValueError):
    """A line that is not bpftrace JSON output of the expected form."""


@dataclasses.dataclass(frozen=True)
class Attached:
    probes: int


@dataclasses.dataclass(frozen=True)
class CgroupSeen:
    """A cgroup made or removed while the program ran, from the cgroup_mkdir or cgroup_rmdir tracepoint."""

    cgroup_id: int
    path: str


@dataclasses.dataclass(frozen=True)
class FlushStarted:
    """The flush probe fired in ``period`` at ``kernel_ns`` (CLOCK_MONOTONIC) and prints the previous period's map next."""

    period: int
    kernel_ns: int


@dataclasses.dataclass(frozen=True)
class SignalSent:
    """A signal that a process sent to another task, from the signal_generate tracepoint."""

    signal: int
    #: Host thread id of the receiving task; the process id when the signal went to a whole process.
    pid: int
    #: si_code: 0 (SI_USER), -1 (SI_QUEUE) or -6 (SI_TKILL).
    code: int
    #: Kernel time of the send, CLOCK_MONOTONIC in ns like the count slots.
    kernel_ns: int
    #: Host process id and command name of the sender.
    sender_pid: int
    sender_comm: str


@dataclasses.dataclass(frozen=True)
class ClearDone:
    """bpftrace finished clearing the map it printed last, at ``boot_time`` (CLOCK_BOOTTIME, 10 ms steps)."""

    boot_time: float


@dataclasses.dataclass(frozen=True)
class SlotCount:
    cgroup_id: int
    arch: str
    nr: int
    slot: int
    count: int


@dataclasses.dataclass(frozen=True)
class CountsPrinted:
    """The entries of one of the count maps when bpftrace printed it."""

    map_name: str
    counts: tuple[SlotCount, ...]


@dataclasses.dataclass(frozen=True)
class HelperFailed:
    """A BPF helper call that failed; for map_update_elem, one syscall that was not counted."""

    helper: str
    retcode: int


@dataclasses.dataclass(frozen=True)
class EventsLost:
    """Output events that the kernel dropped because bpftrace's perf buffer was full."""

    count: int


@dataclasses.dataclass(frozen=True)
class OtherOutput:
    """Output this parser does not use, such as the other maps printed at exit."""

    kind: str
    text: str


Output = (
    Attached
    | CgroupSeen
    | FlushStarted
    | SignalSent
    | CountsPrinted
    | ClearDone
    | HelperFailed
    | EventsLost
    | OtherOutput
)

COUNT_MAPS = ("@counts0", "@counts1", "@counts2")


def split_call(call: int) -> tuple[str, int]:
    """Return the libseccomp arch name and the syscall number of a ``call`` key.

    An x32 number keeps its x32 bit, as in audit records. 0xffffffff is the
    kernel's -1, a syscall entry without a valid number.
    """
    number = call & _NUMBER_MASK
    if number == _NUMBER_MASK:
        number = -1
    if call & I386_FLAG:
        return "x86", number
    if number >= 0 and number & X32_SYSCALL_BIT:
        return "x32", number
    return "x86_64", number


def parse_line(line: str | bytes) -> Output | None:
    """Parse one output line. Returns None for a blank line and raises OutputError for anything invalid."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    if not text.strip():
        return None
    try:
        message = json.loads(text)
        kind = message["type"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"not a bpftrace JSON line ({exc}): {text[:200]!r}") from None
    data = message.get("data")
    try:
        if kind == "attached_probes":
            return Attached(probes=int(data["probes"]))
        if kind == "printf":
            return _parse_printf(str(data))
        if kind == "map":
            return _parse_map(data, text)
        if kind == "cat":
            # /proc/uptime: seconds since boot, then idle seconds.
            return ClearDone(boot_time=float(str(data).split()[0]))
        if kind == "helper_error":
            return HelperFailed(helper=str(message.get("helper", "")), retcode=int(message.get("retcode", 0)))
        if kind == "lost_events":
            return EventsLost(count=int(data["events"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise OutputError(f"invalid bpftrace {kind} line ({exc}): {text[:200]!r}") from None
    return OtherOutput(kind=str(kind), text=text[:200])


def _parse_printf(text: str) -> Output:
    fields = text.rstrip("\n").split(" ", 2)
    if fields[0] == "cgroup" and len(fields) == 3:
        return CgroupSeen(cgroup_id=int(fields[1]), path=fields[2])
    if fields[0] == "flush" and len(fields) == 3:
        return FlushStarted(period=int(fields[1]), kernel_ns=int(fields[2]))
    if fields[0] == "signal":
        return _parse_signal(text)
    return OtherOutput(kind="printf", text=text[:200])


def _parse_signal(text: str) -> SignalSent:
    # The sender's command name comes last because it may contain spaces.
    fields = text.rstrip("\n").split(" ", 6)
    if len(fields) != 7:
        raise ValueError(f"expected 7 fields in a signal line, found {len(fields)}")
    signal, pid, code, kernel_ns, sender_pid = (int(field) for field in fields[1:6])
    return SignalSent(
        signal=signal, pid=pid, code=code, kernel_ns=kernel_ns, sender_pid=sender_pid, sender_comm=fields[6]
    )


def _parse_map(data: Any, text: str) -> Output:
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError("expected one map per line")
    ((name, entries),) = data.items()
    if name not in COUNT_MAPS:
        return OtherOutput(kind="map", text=text[:200])
    if not isinstance(entries, dict):
        raise ValueError(f"{name} is not a keyed map")
    counts = []
    for key, value in entries.items():
        cgroup_id, call, slot = (int(part) for part in key.split(","))
        arch, nr = split_call(call)
        counts.append(SlotCount(cgroup_id=cgroup_id, arch=arch, nr=nr, slot=slot, count=int(value)))
    return CountsPrinted(map_name=name, counts=tuple(counts))
