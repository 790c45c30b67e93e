"""Read the seccomp filters loaded into a running process, with PTRACE_SECCOMP_GET_FILTER.

This needs CAP_SYS_ADMIN and a kernel with CONFIG_CHECKPOINT_RESTORE. The
process is seized and stopped while its filters are copied, then detached. Filters come newest first: index 0 is the filter
installed last.
"""

from __future__ import annotations

import ctypes
import errno
import os

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
_WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)


class FilterReadError(OSError):
    """The filters of a process could not be read. The message gives the cause and the fix."""


def read_loaded_filters(pid: int) -> list[bytes]:
    """Return the raw BPF of every seccomp filter of ``pid``, newest first (empty when it has none).

    Raises FilterReadError when the process cannot be traced or the kernel
    lacks PTRACE_SECCOMP_GET_FILTER.
    """
    if _ptrace(PTRACE_SEIZE, pid, 0, 0) != 0:
        code = ctypes.get_errno()
        raise FilterReadError(code, f"cannot trace pid {pid} to read its seccomp filters: {os.strerror(code)}; run as root")
    try:
        _ptrace(PTRACE_INTERRUPT, pid, 0, 0)
        os.waitpid(pid, _WALL)
        filters = []
        index = 0
        while True:
            count = _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, 0)
            if count < 0:
                code = ctypes.get_errno()
                if code == errno.ENOENT:
                    return filters
                if code == errno.EINVAL and index == 0:
                    return filters
                raise FilterReadError(
                    code,
                    f"PTRACE_SECCOMP_GET_FILTER failed for pid {pid}: {os.strerror(code)} "
                    "(it needs CAP_SYS_ADMIN and a kernel built with CONFIG_CHECKPOINT_RESTORE)",
                )
            buffer = ctypes.create_string_buffer(count * 8)
            _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, ctypes.addressof(buffer))
            filters.append(buffer.raw)
            index += 1
    finally:
        _ptrace(PTRACE_DETACH, pid, 0, 0)


def _ptrace(request: int, pid: int, address: int, data: int) -> int:
    return int(_libc.ptrace(request, pid, ctypes.c_void_p(address), ctypes.c_void_p(data)))
