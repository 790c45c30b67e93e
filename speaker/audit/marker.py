"""A SECCOMP record made on purpose, to know when every earlier record has been read.

The kernel queues audit records in one queue and sends them to the multicast
group and to auditd in order. So when a source stops, it makes one record of
its own: a short-lived thread installs a seccomp filter on itself that logs
getppid, then calls getppid. When that record arrives, every record made
before the stop request has arrived too, or left a serial gap. Only the
marker thread is filtered, and it exits right after the call.

This works with audit disabled, unlike a user message (AUDIT_USER), which the
kernel drops then. The filter is built for x86_64 only; elsewhere ``emit``
returns False and the sources fall back to waiting for a quiet period.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import struct
import threading

from speaker.audit.chunks import ChunkResult
from speaker.audit.records import AUDIT_ARCH_X86_64, SECCOMP_RET_LOG

_GETPPID_X86_64 = 110
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
# Classic BPF opcodes: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K.
_LOAD_WORD, _JUMP_EQUAL, _RETURN = 0x20, 0x15, 0x06
# struct seccomp_data: nr at offset 0, arch at offset 4.
_PROGRAM = [
    (_LOAD_WORD, 0, 0, 4),
    (_JUMP_EQUAL, 0, 3, AUDIT_ARCH_X86_64),
    (_LOAD_WORD, 0, 0, 0),
    (_JUMP_EQUAL, 0, 1, _GETPPID_X86_64),
    (_RETURN, 0, 0, SECCOMP_RET_LOG),
    (_RETURN, 0, 0, _SECCOMP_RET_ALLOW),
]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class DrainMarker:
    """Emit marker records and recognize them among parsed counts."""

    def __init__(self) -> None:
        #: The (pid, arch, nr) counting key of a marker record.
        self.key = (os.getpid(), "x86_64", _GETPPID_X86_64)
        self.supported = platform.machine() == "x86_64"
        self.error = ""

    def emit(self) -> bool:
        """Make one marker record; return False (with ``error`` set) when the filter cannot be installed."""
        if not self.supported:
            self.error = f"no marker filter for {platform.machine()}"
            return False
        outcome: list[str] = []
        thread = threading.Thread(target=self._filtered_call, args=(outcome,), name="speaker-drain-marker")
        thread.start()
        thread.join()
        self.error = outcome[0] if outcome else "the marker thread did not finish"
        return self.error == ""

    @staticmethod
    def _filtered_call(outcome: list[str]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        program = b"".join(struct.pack("=HBBI", *instruction) for instruction in _PROGRAM)
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(_PROGRAM), ctypes.cast(buffer, ctypes.c_void_p))
        # Both settings belong to this thread alone, which ends right after the call.
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            outcome.append("PR_SET_NO_NEW_PRIVS failed: " + os.strerror(ctypes.get_errno()))
            return
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            outcome.append("installing the marker filter failed: " + os.strerror(ctypes.get_errno()))
            return
        libc.syscall(_GETPPID_X86_64)
        outcome.append("")

    def take(self, result: ChunkResult) -> int:
        """Remove marker records from a parsed chunk; return how many there were."""
        return result.remove(self.key)
