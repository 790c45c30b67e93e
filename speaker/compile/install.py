"""Load a compiled BPF program into the calling thread with seccomp(2).

This is for tests and tools that must see the kernel enforce a program, such
as the forked-child proofs. The filter applies to the calling thread, or with
``tsync`` to every thread of the process, and can never be removed, so call
it in a child process.
"""

from __future__ import annotations

import ctypes
import os

from speaker.compile.bpf import parse_program

SYS_SECCOMP = 317  # x86_64
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class PreparedFilter:
    """A program copied into C memory, ready to install without allocating.

    Build it before the code under test starts, because a filter that denies
    mmap or brk would otherwise stop Python from allocating the buffer.
    """

    def __init__(self, bpf: bytes) -> None:
        parse_program(bpf)
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._fprog = _SockFprog(len(bpf) // 8, ctypes.cast(self._buffer, ctypes.c_void_p))

    def install(self, *, new_listener: bool = False, tsync: bool = False, log: bool = False) -> int:
        """Set no_new_privs and load the filter. Return the listener fd with ``new_listener``, else 0.

        Raises OSError with the kernel's errno when prctl or seccomp fails.
        """
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(code)}")
        flags = (
            (SECCOMP_FILTER_FLAG_NEW_LISTENER if new_listener else 0)
            | (SECCOMP_FILTER_FLAG_TSYNC if tsync else 0)
            | (SECCOMP_FILTER_FLAG_LOG if log else 0)
        )
        result = _libc.syscall(
            ctypes.c_long(SYS_SECCOMP),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(flags),
            ctypes.byref(self._fprog),
        )
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"seccomp(SECCOMP_SET_MODE_FILTER) failed: {os.strerror(code)}")
        return int(result)


def install_filter(bpf: bytes, *, new_listener: bool = False, tsync: bool = False, log: bool = False) -> int:
    """Load ``bpf`` into the calling thread; see ``PreparedFilter.install``."""
    return PreparedFilter(bpf).install(new_listener=new_listener, tsync=tsync, log=log)
