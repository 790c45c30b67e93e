"""Raw SECCOMP_IOCTL_NOTIF_* calls on a seccomp listener fd.

The layouts follow include/uapi/linux/seccomp.h (Linux 5.5 and later):

* ``struct seccomp_notif``: u64 id, u32 pid, u32 flags, then ``struct
  seccomp_data`` (s32 nr, u32 arch, u64 instruction_pointer, u64 args[6]),
  80 bytes in all;
* ``struct seccomp_notif_resp``: u64 id, s64 val, s32 error, u32 flags,
  24 bytes.

The calls go through ctypes rather than ``fcntl.ioctl`` for two reasons:
ctypes can release the GIL while the receive call blocks, and the receive
buffer is zeroed in place before each call. The kernel rejects a RECV on a buffer that
is not all zeros with EINVAL, which is why pyseccomp 0.1.2's notify calls
(through libseccomp 2.5.4, which does not zero it) fail on a second receive.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import NamedTuple

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104

#: Response flag: let the syscall run as if no filter had stopped it (Linux 5.5+).
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
#: SET_FLAGS flag: wake the supervisor and the target on the current CPU (Linux 6.6+).
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

NOTIF_SIZE = 80
RESP_SIZE = 24
SECCOMP_DATA_SIZE = 64

_SECCOMP_GET_NOTIF_SIZES = 3
_SYS_SECCOMP_X86_64 = 317

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
#: Bit that marks an x32 syscall number on the x86_64 audit arch.
X32_SYSCALL_BIT = 0x40000000

# id, pid, flags, nr, arch: the fields the supervisor reads on every notification.
_NOTIF_HEAD = struct.Struct("<QIIiI")
_NOTIF_ARGS = struct.Struct("<Q6Q")
_RESP = struct.Struct("<QqiI")
_ZEROS = bytes(NOTIF_SIZE)

_libc = ctypes.CDLL(None, use_errno=True)
# The calls take ready-made ctypes arguments and declare no argtypes, which
# saves about 0.9 µs of argument conversion per call. RECV goes through CDLL,
# which releases the GIL while the call blocks. The other requests return at
# once, so they go through PyDLL and keep the GIL, which saves a release and
# a reacquisition per call.
_blocking_ioctl = _libc["ioctl"]
_quick_ioctl = ctypes.PyDLL(None, use_errno=True)["ioctl"]
_RECV = ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_RECV)
_SEND = ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_SEND)
_ID_VALID = ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_ID_VALID)
_SET_FLAGS = ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_SET_FLAGS)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Notification(NamedTuple):
    """One syscall waiting for the supervisor's decision.

    ``pid`` is the thread id of the caller in the supervisor's pid namespace.
    ``audit_arch`` is the AUDIT_ARCH_* value from seccomp_data.
    """

    id: int
    pid: int
    nr: int
    audit_arch: int


def arch_name(audit_arch: int, nr: int) -> str:
    """Return libseccomp's name for the caller's ABI: ``x86_64``, ``x32``, ``x86``, or the hex value."""
    if audit_arch == AUDIT_ARCH_X86_64:
        return "x32" if nr & X32_SYSCALL_BIT else "x86_64"
    if audit_arch == AUDIT_ARCH_I386:
        return "x86"
    return f"{audit_arch:#x}"


class NotifyFd:
    """A seccomp listener fd with preallocated buffers for the receive and send calls.

    One instance belongs to one thread: the buffers are reused across calls.
    The fd is owned by the caller, who closes it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._fd = ctypes.c_int(fd)
        self._notif = ctypes.create_string_buffer(NOTIF_SIZE)
        self._notif_pointer = ctypes.c_void_p(ctypes.addressof(self._notif))
        # Slice assignment through a memoryview zeroes the buffer about ten
        # times faster than ctypes.memset, which matters at 1 µs per call.
        self._notif_view = memoryview(self._notif).cast("B")
        self._resp = ctypes.create_string_buffer(RESP_SIZE)
        self._resp_pointer = ctypes.c_void_p(ctypes.addressof(self._resp))
        self._id = ctypes.c_uint64()
        self._id_pointer = ctypes.c_void_p(ctypes.addressof(self._id))

    def receive(self) -> Notification | None:
        """Receive the next notification, blocking until one arrives.

        Returns None when there is nothing to respond to. That happens when a
        signal interrupted the wait (EINTR), or when the notification vanished
        before it could be read (ENOENT). A notification vanishes when its
        caller is interrupted or dies, and on Linux 6.6 and later also when
        the filter has no tasks left. Raises OSError for other errors.
        """
        fields = self.receive_fields()
        if fields is None:
            return None
        notification_id, pid, _flags, nr, audit_arch = fields
        return Notification(notification_id, pid, nr, audit_arch)

    def receive_fields(self) -> tuple[int, int, int, int, int] | None:
        """Like ``receive``, but return the plain (id, pid, flags, nr, audit_arch) tuple, for the hot path."""
        self._notif_view[:] = _ZEROS
        if _blocking_ioctl(self._fd, _RECV, self._notif_pointer) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINTR, errno.ENOENT):
                return None
            raise OSError(code, f"SECCOMP_IOCTL_NOTIF_RECV on fd {self.fd} failed: {os.strerror(code)}")
        return _NOTIF_HEAD.unpack_from(self._notif)

    def last_arguments(self) -> tuple[int, ...]:
        """Return the instruction pointer and the six arguments of the last received notification."""
        return _NOTIF_ARGS.unpack_from(self._notif, 24)

    def send_continue(self, notification_id: int) -> bool:
        """Let the syscall run. Returns False if the notification no longer exists."""
        return self._send(notification_id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def send_error(self, notification_id: int, error: int) -> bool:
        """Fail the syscall with ``-error`` (such as errno.EPERM). Returns False if it no longer exists."""
        return self._send(notification_id, -error, 0)

    def _send(self, notification_id: int, error: int, flags: int) -> bool:
        _RESP.pack_into(self._resp, 0, notification_id, 0, error, flags)
        while _quick_ioctl(self._fd, _SEND, self._resp_pointer) != 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            # ENOENT: the caller died or was interrupted, or the notification
            # already has a response (from the watchdog, for example).
            if code == errno.ENOENT:
                return False
            raise OSError(code, f"SECCOMP_IOCTL_NOTIF_SEND on fd {self.fd} failed: {os.strerror(code)}")
        return True

    def id_valid(self, notification_id: int) -> bool:
        """Return whether the notification still waits for a response (its caller is alive and blocked)."""
        self._id.value = notification_id
        return _quick_ioctl(self._fd, _ID_VALID, self._id_pointer) == 0

    def set_sync_wake_up(self) -> bool:
        """Ask for same-CPU wake-ups. Returns False on kernels older than 6.6, which lack the flag."""
        flag = ctypes.c_ulong(SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        if _quick_ioctl(self._fd, _SET_FLAGS, flag) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOTTY):
            return False
        raise OSError(code, f"SECCOMP_IOCTL_NOTIF_SET_FLAGS on fd {self.fd} failed: {os.strerror(code)}")


def kernel_notif_sizes() -> tuple[int, int, int]:
    """Return the kernel's sizes of seccomp_notif, seccomp_notif_resp and seccomp_data.

    Uses seccomp(SECCOMP_GET_NOTIF_SIZES). Raises OSError where the kernel
    has no user notification (before Linux 5.0) or on other machines than x86_64.
    """
    sizes = (ctypes.c_uint16 * 3)()
    if os.uname().machine != "x86_64":
        raise OSError(errno.ENOSYS, f"the seccomp syscall number is only known for x86_64, not {os.uname().machine}")
    if _syscall(_SYS_SECCOMP_X86_64, _SECCOMP_GET_NOTIF_SIZES, 0, ctypes.byref(sizes)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"seccomp(SECCOMP_GET_NOTIF_SIZES) failed: {os.strerror(code)}")
    return sizes[0], sizes[1], sizes[2]


def check_kernel_layout() -> None:
    """Raise OSError unless the kernel's notification structs have the sizes this module packs.

    A newer kernel may grow them: the receive buffer must then be at least as
    large as the kernel's struct, or RECV writes past it.
    """
    notif, resp, data = kernel_notif_sizes()
    if notif > NOTIF_SIZE or resp > RESP_SIZE or data > SECCOMP_DATA_SIZE:
        raise OSError(
            errno.EINVAL,
            f"the kernel's seccomp notification structs are larger than expected "
            f"(notif {notif}, resp {resp}, data {data} bytes; this module packs {NOTIF_SIZE}, {RESP_SIZE}, "
            f"{SECCOMP_DATA_SIZE}): update speaker/notify/ioctl.py",
        )
