"""Fork, exec and exit events of every process, from the kernel's proc connector.

The proc connector (``CONFIG_PROC_EVENTS``) multicasts one message per process
event on a ``NETLINK_CONNECTOR`` socket bound to the ``CN_IDX_PROC`` group.
Subscribing needs CAP_NET_ADMIN and a process in the initial pid namespace,
and the pids in the messages are host pids. Layouts are those of
linux/connector.h and linux/cn_proc.h.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")
#: struct cn_msg: cb_id (idx, val), seq, ack, len, flags.
_CN_MSG = struct.Struct("=IIIIHH")
#: struct proc_event header: what, cpu, timestamp_ns.
_PROC_EVENT = struct.Struct("=IIQ")
_FORK = struct.Struct("=IIII")
_PIDS = struct.Struct("=II")
_HEADER_SIZE = _NLMSGHDR.size + _CN_MSG.size
_EVENT_OFFSET = _HEADER_SIZE + _PROC_EVENT.size


@dataclasses.dataclass(frozen=True, slots=True)
class ProcEvent:
    """One process event. ``kind`` is ``fork``, ``exec`` or ``exit``; times are wall-clock seconds."""

    kind: str
    #: Thread group id of the new process (fork) or of the process (exec, exit).
    pid: int
    #: Thread group id of the parent, for fork.
    parent: int
    time: float


class ProcConnectorError(OSError):
    """The proc connector cannot be opened: missing privileges, or a kernel without CONFIG_PROC_EVENTS."""


class ProcConnector:
    """A subscribed proc connector socket that is read without blocking."""

    def __init__(self, receive_buffer: int = 8 << 20) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise ProcConnectorError(exc.errno, f"cannot open a NETLINK_CONNECTOR socket: {exc.strerror}") from None
        try:
            self._set_receive_buffer(receive_buffer)
            self.sock.bind((0, CN_IDX_PROC))
            self._send_op(PROC_CN_MCAST_LISTEN)
        except OSError as exc:
            self.sock.close()
            raise ProcConnectorError(
                exc.errno, f"cannot subscribe to process events (needs CAP_NET_ADMIN on the host): {exc.strerror}"
            ) from None
        self.sock.setblocking(False)
        self._buffer = bytearray(4096)
        #: Times the kernel dropped messages because the socket buffer was full.
        self.overflows = 0

    def _set_receive_buffer(self, size: int) -> None:
        try:
            # SO_RCVBUFFORCE (root only) ignores net.core.rmem_max.
            self.sock.setsockopt(socket.SOL_SOCKET, 33, size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def _send_op(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn_msg = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0)
        header = _NLMSGHDR.pack(_HEADER_SIZE + len(payload), NLMSG_DONE, 0, 0, os.getpid())
        self.sock.send(header + cn_msg + payload)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_available(self) -> list[ProcEvent]:
        """Return every event queued on the socket, without waiting.

        An overflow (ENOBUFS) is counted in ``overflows`` and reading goes on,
        because the events after it are still valid.
        """
        events: list[ProcEvent] = []
        # proc_event times come from CLOCK_MONOTONIC, which time.monotonic() reads.
        offset = time.time() - time.monotonic()
        buffer = self._buffer
        while True:
            try:
                size = self.sock.recv_into(buffer)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                raise
            event = self._parse(buffer, size, offset)
            if event is not None:
                events.append(event)

    @staticmethod
    def _parse(buffer: bytearray, size: int, offset: float) -> ProcEvent | None:
        if size < _EVENT_OFFSET:
            return None
        what, _cpu, timestamp_ns = _PROC_EVENT.unpack_from(buffer, _HEADER_SIZE)
        when = timestamp_ns / 1e9 + offset
        if what == PROC_EVENT_FORK and size >= _EVENT_OFFSET + _FORK.size:
            _parent_pid, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(buffer, _EVENT_OFFSET)
            if child_pid != child_tgid:
                return None  # a new thread of an existing process
            return ProcEvent("fork", child_tgid, parent_tgid, when)
        if what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT) and size >= _EVENT_OFFSET + _PIDS.size:
            pid, tgid = _PIDS.unpack_from(buffer, _EVENT_OFFSET)
            if pid != tgid:
                return None  # a thread, not the whole process
            return ProcEvent("exec" if what == PROC_EVENT_EXEC else "exit", tgid, 0, when)
        return None

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self._send_op(PROC_CN_MCAST_IGNORE)
        except OSError:
            pass
        self.sock.close()


class ProcEventThread:
    """Read a proc connector on a thread of its own and pass each batch of events to ``handle``.

    The thread keeps up with forks even while the event loop is busy, which
    matters because a child's cgroup can only be read while the child exists.
    ``handle`` runs on the thread, so it must lock whatever it shares.
    """

    def __init__(self, connector: ProcConnector, handle: Callable[[list[ProcEvent]], None], log: Any) -> None:
        self.connector = connector
        self.handle = handle
        self.log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="speaker-proc-events", daemon=True)
        #: The error that ended the thread, if any.
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.connector.fileno(), select.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(200):
                    events = self.connector.read_available()
                    if events:
                        self.handle(events)
        except Exception as exc:  # noqa: BLE001 - reported through ``error`` and the log
            self.error = exc
            self.log.error("proc_events_failed", error=f"{type(exc).__name__}: {exc}")
