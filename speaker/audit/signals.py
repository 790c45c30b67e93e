"""Find the signals that the audit rule of ``speaker.audit.rules`` records.

For each kill, tkill, tgkill or pidfd_send_signal call that the rule matches,
the kernel writes one event of several records with one serial number
(audit.log type names, or the numbers that ``audit_netlink`` writes)::

    type=SYSCALL msg=audit(1796422171.457:46379344): arch=c000003e syscall=62
        success=yes exit=0 a0=2686 a1=f ... pid=10004 ... comm="runc"
        exe="/usr/sbin/runc" key="speaker-stop-signal"
    type=OBJ_PID msg=audit(1796422171.457:46379344): opid=9862 oauid=-1
        ouid=0 oses=-1 ocomm="redis-server"
    type=PROCTITLE ...
    type=EOE msg=audit(1796422171.457:46379344):

The SYSCALL record gives the time of the call, the sender and the signal
number (``a1``, or ``a2`` for tgkill, in hex). Each OBJ_PID record names one
receiver by its host pid (kill with a negative pid makes several). Records of
one event can be split over two chunks, so a SYSCALL record waits for its
OBJ_PID records until the event's EOE record arrives.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from speaker.audit.records import decode_value

#: Filter key of the rule, which the kernel writes into each SYSCALL record it matches.
RULE_KEY = "speaker-stop-signal"

#: x86_64 numbers of the syscalls that send a signal to another process.
KILL, TKILL, TGKILL, PIDFD_SEND_SIGNAL = 62, 200, 234, 424
SIGNAL_SYSCALLS = {KILL: "kill", TKILL: "tkill", TGKILL: "tgkill", PIDFD_SEND_SIGNAL: "pidfd_send_signal"}

_VALUE = rb'(?:"[^"\n]*"|[0-9A-F]+|\(null\))'
_KEY_FIELD = b' key="' + RULE_KEY.encode() + b'"'
_SYSCALL = re.compile(
    rb"type=(?:SYSCALL|1300) msg=audit\((\d+\.\d+):(\d+)\): arch=c000003e syscall=(\d+) (?:per=[0-9a-f]+ )?"
    rb"success=(yes|no) exit=-?\d+ a0=[0-9a-f]+ a1=([0-9a-f]+) a2=([0-9a-f]+) a3=[0-9a-f]+ items=\d+ "
    rb"ppid=\d+ pid=(\d+) [^\n]*? comm=(" + _VALUE + rb") [^\n]*?" + re.escape(_KEY_FIELD)
)
_OBJ_PID = re.compile(rb"type=(?:OBJ_PID|1318) msg=audit\(\d+\.\d+:(\d+)\): opid=(\d+) [^\n]*?ocomm=(" + _VALUE + rb")")
_END_OF_EVENT = re.compile(rb"type=(?:EOE|1320) msg=audit\(\d+\.\d+:(\d+)\):")
#: SYSCALL records kept while they wait for their OBJ_PID records; the oldest is dropped beyond this.
_MAX_WAITING = 1024


class SignalSend(NamedTuple):
    """One signal that one process sent to another, from one audit event."""

    #: Kernel time of the sending syscall, in seconds since the epoch.
    time: float
    serial: int
    #: Name of the sending syscall, such as ``kill``.
    syscall: str
    signal: int
    sender_pid: int
    sender_comm: str
    #: Host pid of the receiving process.
    pid: int
    comm: str


class _Waiting(NamedTuple):
    time: float
    syscall: str
    signal: int
    sender_pid: int
    sender_comm: str


class SignalScanner:
    """Collect SignalSends from chunks of audit.log lines, in the order the chunks arrive."""

    def __init__(self) -> None:
        self._waiting: dict[int, _Waiting] = {}

    def scan(self, buffer: bytes | bytearray, end: int) -> list[SignalSend]:
        """Return the signals whose OBJ_PID records are in ``buffer[:end]``."""
        if buffer.find(_KEY_FIELD, 0, end) >= 0:
            for match in _SYSCALL.finditer(buffer, 0, end):
                self._note_syscall(match)
        if not self._waiting:
            return []
        sends = []
        for match in _OBJ_PID.finditer(buffer, 0, end):
            waiting = self._waiting.get(int(match.group(1)))
            if waiting is not None:
                sends.append(
                    SignalSend(
                        time=waiting.time,
                        serial=int(match.group(1)),
                        syscall=waiting.syscall,
                        signal=waiting.signal,
                        sender_pid=waiting.sender_pid,
                        sender_comm=waiting.sender_comm,
                        pid=int(match.group(2)),
                        comm=decode_value(match.group(3)),
                    )
                )
        for match in _END_OF_EVENT.finditer(buffer, 0, end):
            self._waiting.pop(int(match.group(1)), None)
        return sends

    def _note_syscall(self, match: re.Match[bytes]) -> None:
        stamp, serial, nr_text, success, arg1, arg2, sender, comm = match.groups()
        nr = int(nr_text)
        name = SIGNAL_SYSCALLS.get(nr)
        if name is None or success != b"yes":
            # A failed call delivered nothing; other syscalls are not this rule's.
            return
        signal = int(arg2 if nr == TGKILL else arg1, 16)
        if len(self._waiting) >= _MAX_WAITING:
            del self._waiting[next(iter(self._waiting))]
        self._waiting[int(serial)] = _Waiting(float(stamp), name, signal, int(sender), decode_value(comm))
