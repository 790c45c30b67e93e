"""Drain the audit multicast socket on a thread, into a bounded buffer of audit.log lines.

The kernel drops a multicast record for a listener whose receive buffer is
full and reports ENOBUFS to it once, without counting the record in its lost
counter. So the socket is read by a dedicated thread that does nothing but
copy each record out, and the pipeline parses the copies in batches.

Each netlink message becomes one line in auditd's format, ``type=SECCOMP
msg=`` followed by the payload, so one parser serves both audit sources.
Other record types are written with their number, as in ``type=1300 msg=``.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

from speaker.audit.records import AUDIT_SECCOMP

_LENGTH_AND_TYPE = struct.Struct("=IH")
_HEADER_SIZE = 16
_SECCOMP_PREFIX = b"type=SECCOMP msg="
#: Largest datagram read at once; an audit record is at most 8970 bytes.
_DATAGRAM_SIZE = 65536


class MulticastReader:
    """Copy records from a multicast socket into a buffer that ``take`` empties.

    When the buffer contains ``max_pending`` bytes, the thread stops reading
    until ``take`` makes room, so a slow pipeline fills the socket, and the
    kernel's ENOBUFS reports (counted in ``overflows``) show the loss.
    """

    def __init__(self, sock: socket.socket, max_pending: int) -> None:
        self._sock = sock
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._pending = bytearray()
        self._overflows = 0
        self._draining = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="speaker-audit-reader", daemon=True)
        #: Messages read so far.
        self.messages = 0
        #: ENOBUFS reports so far.
        self.overflows_total = 0
        #: The error that ended the thread, if any.
        self.error: OSError | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def take(self) -> tuple[bytearray, int]:
        """Return the lines read since the last call and the number of ENOBUFS reports among them."""
        with self._lock:
            data, self._pending = self._pending, bytearray()
            overflows, self._overflows = self._overflows, 0
            self._room.notify_all()
        return data, overflows

    def drain(self) -> None:
        """Ask the thread to stop once the socket has been empty for one poll interval."""
        self._draining.set()
        with self._lock:
            self._room.notify_all()

    def abort(self) -> None:
        """Ask the thread to stop at once, and wait for it."""
        self._abort.set()
        with self._lock:
            self._room.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        sock = self._sock
        buffer = bytearray(_DATAGRAM_SIZE)
        view = memoryview(buffer)
        sock.settimeout(0.1)
        while not self._abort.is_set():
            try:
                size = sock.recv_into(buffer)
            except TimeoutError:
                if self._draining.is_set():
                    return
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    with self._lock:
                        self._overflows += 1
                        self.overflows_total += 1
                    continue
                if exc.errno == errno.EINTR:
                    continue
                self.error = exc
                return
            self._append(buffer, view, size)

    def _append(self, buffer: bytearray, view: memoryview, size: int) -> None:
        with self._room:
            while len(self._pending) >= self._max_pending and not self._abort.is_set():
                self._room.wait(0.1)
            self.messages += append_lines(self._pending, view, size)


def append_lines(pending: bytearray, datagram: bytes | bytearray | memoryview, size: int) -> int:
    """Append each netlink message of a datagram to ``pending`` as an audit.log line; return how many."""
    view = memoryview(datagram)
    count = 0
    offset = 0
    while offset + _HEADER_SIZE <= size:
        length, msg_type = _LENGTH_AND_TYPE.unpack_from(view, offset)
        if length < _HEADER_SIZE or offset + length > size:
            break
        end = offset + length
        # Some senders end the text with a NUL.
        while end > offset + _HEADER_SIZE and view[end - 1] == 0:
            end -= 1
        pending += _SECCOMP_PREFIX if msg_type == AUDIT_SECCOMP else b"type=%d msg=" % msg_type
        pending += view[offset + _HEADER_SIZE : end]
        pending += b"\n"
        count += 1
        offset += (length + 3) & ~3
    return count
