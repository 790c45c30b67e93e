"""Run syscalls in a forked child under a compiled filter and report what the kernel did.

The child installs the filter and then makes only the probe syscalls and the
few calls the harness itself needs (``HARNESS``). Results go into a
preallocated ctypes array and out through raw write(2), so the child
allocates nothing after the filter is in place. 32-bit syscalls enter through
``int 0x80`` from a small code page, and x32 syscalls through libc's
syscall() with X32_SYSCALL_BIT set.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import re
import resource
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence

from speaker.compile.arches import X32_SYSCALL_BIT, syscall_table
from speaker.compile.install import PreparedFilter

#: Syscalls the child makes besides the probes: reporting (write), receiving
#: the go-ahead (read), sending the listener fd (sendmsg), and what CPython
#: may do between two probes (memory and signal-mask calls).
HARNESS: frozenset[str] = frozenset(
    {
        "read",
        "write",
        "sendmsg",
        "mmap",
        "munmap",
        "brk",
        "madvise",
        "mprotect",
        "rt_sigprocmask",
        "rt_sigaction",
        "futex",
        "close",
        "exit",
        "exit_group",
    }
)

#: Harmless syscalls without arguments that CPython does not make on its own,
#: by name. Each arch probes the ones it has (x86 through the 32-bit ids).
PROBES_64: tuple[str, ...] = (
    "getppid",
    "getuid",
    "getgid",
    "geteuid",
    "getegid",
    "getpgrp",
    "sched_yield",
    "gettid",
    "getpid",
    "munlockall",
    "inotify_init",
)
PROBES_32: tuple[str, ...] = (
    "getppid",
    "getuid32",
    "getgid32",
    "geteuid32",
    "getegid32",
    "getpgrp",
    "sched_yield",
    "gettid",
    "getpid",
    "munlockall",
    "inotify_init",
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.write.restype = ctypes.c_ssize_t
_libc.write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)

# mov eax, edi; int 0x80; ret. The kernel returns -errno in eax.
_INT80_CODE = bytes((0x89, 0xF8, 0xCD, 0x80, 0xC3))
_RESULT = struct.Struct("<qi4x")

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_NOTIF = struct.Struct("<QII iI Q 6Q")  # id, pid, flags, then seccomp_data
_NOTIF_RESP = struct.Struct("<QqiI")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One syscall for the child to make."""

    arch: str
    name: str

    @property
    def nr(self) -> int:
        nr = syscall_table(self.arch).number(self.name)
        assert nr is not None, f"{self.name} does not exist on {self.arch}"
        return nr


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one probe returned: ``value`` on success, ``errno`` on failure."""

    probe: Probe
    value: int
    errno: int


@dataclasses.dataclass
class ChildResult:
    """How the child ended and what each probe it reached returned."""

    outcomes: list[Outcome]
    #: Signal that killed the child, or 0 when it exited.
    signal: int
    exit_code: int
    #: Notifications the listener received, as (arch, name) in arrival order.
    notified: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: Pid of the child, for matching audit records.
    pid: int = 0


class _Int80:
    """Callable 32-bit syscall entry from an executable page mapped before the filter."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_INT80_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.call = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(address)


def _child_main(
    prepared: PreparedFilter,
    probes: Sequence[Probe],
    report_fd: int,
    fd_socket: socket.socket | None,
    int80: _Int80,
    before_probes: Callable[[], None] | None,
) -> None:
    results = (ctypes.c_char * _RESULT.size)()
    numbers = [probe.nr for probe in probes]
    kinds = [probe.arch for probe in probes]
    syscall = _libc.syscall
    get_errno = ctypes.get_errno
    write = _libc.write
    pack_into = _RESULT.pack_into
    try:
        listener = prepared.install(new_listener=fd_socket is not None)
    except OSError as exc:
        os.write(report_fd, b"install failed: " + str(exc).encode())
        os._exit(3)
    if fd_socket is not None:
        socket.send_fds(fd_socket, [b"fd"], [listener])
    if before_probes is not None:
        before_probes()
    for index in range(len(numbers)):
        kind = kinds[index]
        if kind == "x86":
            value = int80.call(numbers[index])
            code = -value if -4096 < value < 0 else 0
        else:
            value = syscall(ctypes.c_long(numbers[index]))
            code = get_errno() if value == -1 else 0
        pack_into(results, 0, value, code)
        write(report_fd, results, _RESULT.size)
    os._exit(0)


def run_probes(
    bpf: bytes,
    probes: Sequence[Probe],
    *,
    listener: Callable[[int, int], int] | None = None,
    before_probes: Callable[[], None] | None = None,
    timeout: float = 10.0,
) -> ChildResult:
    """Fork, install ``bpf`` in the child and make ``probes`` there.

    With ``listener``, the filter is installed with
    SECCOMP_FILTER_FLAG_NEW_LISTENER and the parent replies to each
    notification. ``listener(arch_token, nr)`` returns 0 to let the syscall
    continue or a positive errno to fail it.
    """
    prepared = PreparedFilter(bpf)
    int80 = _Int80()
    read_end, write_end = os.pipe()
    parent_socket = child_socket = None
    if listener is not None:
        parent_socket, child_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            # A seccomp kill would otherwise leave a core file behind.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.close(read_end)
            if parent_socket is not None:
                parent_socket.close()
            _child_main(prepared, probes, write_end, child_socket, int80, before_probes)
        finally:
            os._exit(4)
    os.close(write_end)
    if child_socket is not None:
        child_socket.close()
    notified: list[tuple[str, str]] = []
    answer_thread = None
    if listener is not None and parent_socket is not None:
        parent_socket.settimeout(timeout)
        _, fds, _, _ = socket.recv_fds(parent_socket, 16, 1)
        if not fds:
            raise AssertionError("the child sent no listener fd")
        answer_thread = threading.Thread(target=_answer, args=(fds[0], listener, notified, timeout), daemon=True)
        answer_thread.start()
    data = _read_all(read_end, timeout)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if answer_thread is not None:
        answer_thread.join(timeout)
    if parent_socket is not None:
        parent_socket.close()
    if data.startswith(b"install failed"):
        raise AssertionError(data.decode())
    outcomes = []
    for index, (value, code) in enumerate(_RESULT.iter_unpack(data[: len(data) // _RESULT.size * _RESULT.size])):
        outcomes.append(Outcome(probes[index], value, code))
    return ChildResult(
        outcomes=outcomes,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1,
        notified=notified,
        pid=pid,
    )


def int80_available() -> bool:
    """Return whether this kernel runs 32-bit syscalls (IA32 emulation), tried in a child that may crash."""
    int80 = _Int80()
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # 20 is getpid on i386.
        os._exit(0 if int80.call(20) > 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _read_all(fd: int, timeout: float) -> bytes:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise AssertionError(f"the child sent nothing for {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _answer(fd: int, listener: Callable[[int, int], int], notified: list[tuple[str, str]], timeout: float) -> None:
    """Reply to the notifications on ``fd`` until the child is gone."""
    import fcntl

    from speaker.compile.arches import KERNEL_ARCH_TOKENS

    arch_names = {"x86": KERNEL_ARCH_TOKENS["x86"], "x86_64": KERNEL_ARCH_TOKENS["x86_64"]}
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            events = poller.poll(timeout * 1000)
            if not events:
                return
            _, revents = events[0]
            # POLLHUP without POLLIN: every task of the filter is gone.
            if revents & select.POLLHUP and not revents & select.POLLIN:
                return
            # The kernel rejects a receive buffer that is not zeroed.
            buffer = bytearray(_NOTIF.size)
            try:
                fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                return
            notif_id, _pid, _flags, nr, arch_token, _ip, *_args = _NOTIF.unpack(buffer)
            if arch_token == arch_names["x86"]:
                arch = "x86"
            elif nr & X32_SYSCALL_BIT:
                arch = "x32"
            else:
                arch = "x86_64"
            notified.append((arch, syscall_table(arch).name(nr) or str(nr)))
            error = listener(arch_token, nr)
            flags = 0 if error else SECCOMP_USER_NOTIF_FLAG_CONTINUE
            response = bytearray(_NOTIF_RESP.pack(notif_id, 0, -error, flags))
            try:
                fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, response, True)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    return
    finally:
        os.close(fd)


NETLINK_AUDIT = 9
SO_RCVBUFFORCE = 33
AUDIT_NLGRP_READLOG = 1
AUDIT_SECCOMP = 1326
_SECCOMP_RECORD = re.compile(rb" pid=(\d+) .* arch=([0-9a-f]+) syscall=(\d+) .* code=(0x[0-9a-f]+)")


class AuditRecords:
    """Collect SECCOMP audit records from the kernel's audit multicast group while in a ``with`` block.

    Listening to the multicast group needs CAP_AUDIT_READ and leaves any
    running auditd untouched. ``records`` contains (pid, audit arch, syscall nr, action code).
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int, int]] = []
        #: Times the kernel dropped multicast messages because the socket buffer was full (ENOBUFS).
        self.overflows = 0
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
        except PermissionError:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024 * 1024)
        self._socket.bind((0, AUDIT_NLGRP_READLOG))
        self._socket.settimeout(0.1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AuditRecords:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join()
        self._socket.close()

    def wait_for(self, pid: int, count: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
        """Return (arch, nr, code) of ``pid``'s records once ``count`` arrived or ``timeout`` passed."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(pid)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        return self.of(pid)

    def of(self, pid: int) -> list[tuple[int, int, int]]:
        return [(arch, nr, code) for record_pid, arch, nr, code in list(self.records) if record_pid == pid]

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self._socket.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                # Other tracers on the host can flood the group; count the loss and go on.
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                continue
            offset = 0
            while offset + 16 <= len(data):
                length = int.from_bytes(data[offset : offset + 4], "little")
                kind = int.from_bytes(data[offset + 4 : offset + 6], "little")
                if length < 16:
                    break
                if kind == AUDIT_SECCOMP:
                    match = _SECCOMP_RECORD.search(data[offset + 16 : offset + length])
                    if match:
                        pid, arch, nr, code = match.groups()
                        self.records.append((int(pid), int(arch, 16), int(nr), int(code, 16)))
                offset += (length + 3) & ~3
