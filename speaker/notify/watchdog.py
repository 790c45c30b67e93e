"""A separate process that responds to notifications the supervisor leaves waiting.

runc, ``docker run`` and the container's task wait forever for a response
that never comes. A watchdog thread inside the supervisor would stop with it
(SIGSTOP, a debugger, a thread that keeps the GIL), so the watchdog is its
own process. It keeps a duplicate of every listener fd and reads the slot
table (``speaker.notify.slots``) that the responders write. Every
``timeout / 4`` it checks for the following cases and responds with EPERM in
enforce mode, or with CONTINUE in complain mode:

* a notification the responder received but did not release within ``timeout``;
* a notification still pending (the fd polls readable) while the responder
  received nothing for ``timeout``: the watchdog receives it itself;
* a held notification whose deadline passed ``timeout`` ago;
* a connection that waits on the supervisor's socket while the supervisor
  accepted nothing for ``timeout``: the watchdog accepts it and responds to
  every notification of that fd itself, so that ``docker run`` or
  ``docker exec`` fails instead of hanging.

It logs every response. It also dies with the supervisor (PR_SET_PDEATHSIG
and the end of its control socket), so that a killed supervisor leaves no
listener open and the container's notified syscalls fail with ENOSYS.

Control messages arrive on a SOCK_SEQPACKET socket as JSON:
``{"op": "add", "slot": N, "container": ID}`` with the fd attached, and
``{"op": "remove", "slot": N}``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import structlog

from speaker.notify.handoff import HandoffError, accept_handoff
from speaker.notify.ioctl import NotifyFd
from speaker.notify.slots import (
    ACCEPTED,
    HOLD_BASE,
    HOLDS_PER_SLOT,
    RECEIVED,
    RECEIVED_INFO,
    RELEASED,
    WATCHDOG_RESPONSES,
    SlotTable,
)

_PR_SET_PDEATHSIG = 1
_MAX_RECEIVES_PER_CHECK = 64


class WatchdogClient:
    """The supervisor's side: starts the watchdog process and hands it listener fds."""

    def __init__(self, table: SlotTable, timeout: float, response: str) -> None:
        self.table = table
        self.timeout = timeout
        self.response = response
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, listening_fd: int) -> None:
        """Start the process, giving it the supervisor's listening socket too.

        Call from the thread that lives as long as the supervisor.

        The kernel sends PR_SET_PDEATHSIG when the thread that forked the
        child exits, not the whole process.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        command = [
            sys.executable,
            "-m",
            "speaker.notify.watchdog",
            "--control-fd",
            str(theirs.fileno()),
            "--table-fd",
            str(self.table.fd),
            "--slots",
            str(self.table.count),
            "--timeout",
            str(self.timeout),
            "--response",
            self.response,
            "--parent-pid",
            str(os.getpid()),
            "--listen-fd",
            str(listening_fd),
        ]
        try:
            self.process = subprocess.Popen(
                command, pass_fds=(theirs.fileno(), self.table.fd, listening_fd), stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        self._socket = ours

    def add(self, slot: int, fd: int, container_id: str) -> None:
        """Give the watchdog a duplicate of ``fd`` for ``slot``. Raises OSError if the watchdog is gone."""
        message = json.dumps({"op": "add", "slot": slot, "container": container_id}).encode()
        with self._lock:
            if self._socket is None:
                raise OSError(errno.EPIPE, "the watchdog is not running")
            socket.send_fds(self._socket, [message], [fd])

    def remove(self, slot: int) -> None:
        message = json.dumps({"op": "remove", "slot": slot}).encode()
        with self._lock:
            if self._socket is None:
                return
            try:
                self._socket.send(message)
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 2.0) -> None:
        """Close the control socket, which ends the watchdog, and wait for it."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclasses.dataclass
class _Watched:
    """The watchdog's state of one slot between checks."""

    fd: NotifyFd
    container_id: str
    #: (received id, monotonic time first seen in flight), or None.
    in_flight: tuple[int, float] | None = None
    #: Received id and time when the fd was first seen readable without progress.
    pending_since: tuple[int, float] | None = None


class Watchdog:
    """The process's main loop."""

    def __init__(
        self, control: socket.socket, listening: socket.socket, table: SlotTable, timeout: float, response: str
    ) -> None:
        self.control = control
        self.listening = listening
        self.table = table
        self.timeout = timeout
        self.response = response
        self.watched: dict[int, _Watched] = {}
        #: Listener fds the watchdog accepted itself, by fd, with their container id.
        self.orphans: dict[int, tuple[NotifyFd, str]] = {}
        #: (supervisor's accept count, time) when a waiting connection was first seen.
        self.waiting_since: tuple[int, float] | None = None
        self.log = structlog.get_logger("speaker").bind(component="notify_watchdog")

    def run(self) -> None:
        interval = max(self.timeout / 4, 0.005)
        next_check = time.monotonic() + interval
        self.poller = select.poll()
        self.poller.register(self.control, select.POLLIN)
        self.log.info("watchdog_started", timeout=self.timeout, response=self.response)
        running = True
        while running:
            wait_ms = max(0, int((next_check - time.monotonic()) * 1000))
            for fd, events in self.poller.poll(wait_ms):
                if fd == self.control.fileno():
                    running = self._read_control()
                else:
                    self._respond_orphan(fd, events)
            now = time.monotonic()
            if now >= next_check:
                self._check(now)
                self._check_accept(now)
                next_check = now + interval
        for slot in list(self.watched):
            self._forget(slot)
        for fd in list(self.orphans):
            self._drop_orphan(fd)
        self.log.info("watchdog_stopped")

    def _read_control(self) -> bool:
        try:
            message, fds, _flags, _ = socket.recv_fds(self.control, 4096, 1)
        except OSError as exc:
            self.log.error("watchdog_control_failed", error=str(exc))
            return False
        if not message:
            return False
        request = json.loads(message)
        slot = int(request["slot"])
        if request["op"] == "add" and fds:
            self._forget(slot)
            self.watched[slot] = _Watched(fd=NotifyFd(fds[0]), container_id=str(request.get("container", "")))
        elif request["op"] == "remove":
            self._forget(slot)
        for extra in fds[1:]:
            os.close(extra)
        return True

    def _forget(self, slot: int) -> None:
        watched = self.watched.pop(slot, None)
        if watched is not None:
            os.close(watched.fd.fd)

    def _check(self, now: float) -> None:
        words = self.table.words
        for slot, watched in list(self.watched.items()):
            base = self.table.base(slot)
            received = words[base + RECEIVED]
            if received != words[base + RELEASED]:
                if watched.in_flight is None or watched.in_flight[0] != received:
                    watched.in_flight = (received, now)
                elif now - watched.in_flight[1] >= self.timeout:
                    info = words[base + RECEIVED_INFO]
                    self._respond(slot, watched, received, info >> 32, info & 0xFFFFFFFF, "not_released")
                    words[base + RELEASED] = received
                    watched.in_flight = None
            else:
                watched.in_flight = None
            self._check_holds(slot, watched, base, now)
            self._check_pending(slot, watched, received, now)

    def _check_holds(self, slot: int, watched: _Watched, base: int, now: float) -> None:
        words = self.table.words
        now_ns = int(now * 1e9)
        for hold in range(HOLDS_PER_SLOT):
            deadline = words[base + HOLD_BASE + 2 * hold + 1]
            if deadline and now_ns - deadline >= self.timeout * 1e9:
                notification_id = words[base + HOLD_BASE + 2 * hold]
                words[base + HOLD_BASE + 2 * hold + 1] = 0
                self._respond(slot, watched, notification_id, 0, -1, "hold_not_released")

    def _check_pending(self, slot: int, watched: _Watched, received: int, now: float) -> None:
        readable = select.select([watched.fd.fd], [], [], 0)[0]
        if not readable:
            watched.pending_since = None
            return
        if watched.pending_since is None or watched.pending_since[0] != received:
            watched.pending_since = (received, now)
            return
        if now - watched.pending_since[1] < self.timeout:
            return
        # The responder received nothing for a whole timeout although
        # notifications wait: take them over until the fd is drained.
        for _ in range(_MAX_RECEIVES_PER_CHECK):
            if not select.select([watched.fd.fd], [], [], 0)[0]:
                break
            notification = watched.fd.receive()
            if notification is None:
                continue
            self._respond(slot, watched, notification.id, notification.pid, notification.nr, "not_received")
        watched.pending_since = None

    def _check_accept(self, now: float) -> None:
        """Accept the waiting connections when the supervisor accepted none for a whole timeout."""
        accepted = self.table.words[ACCEPTED]
        if not select.select([self.listening], [], [], 0)[0]:
            self.waiting_since = None
            return
        if self.waiting_since is None or self.waiting_since[0] != accepted:
            self.waiting_since = (accepted, now)
            return
        if now - self.waiting_since[1] < self.timeout:
            return
        self.waiting_since = None
        while select.select([self.listening], [], [], 0)[0]:
            try:
                handoff = accept_handoff(self.listening, self.timeout)
            except BlockingIOError:
                break
            except HandoffError as exc:
                self.log.warning("watchdog_handoff_rejected", error=str(exc))
                continue
            except OSError as exc:
                self.log.error("watchdog_accept_failed", error=str(exc))
                break
            self.orphans[handoff.fd] = (NotifyFd(handoff.fd), handoff.state.container_id)
            self.poller.register(handoff.fd, select.POLLIN)
            self.log.warning(
                "watchdog_accepted",
                container=handoff.state.container_id,
                pid=handoff.state.pid,
                status=handoff.state.status,
                reason=f"the supervisor accepted no connection for {self.timeout} s",
                action="allowed" if self.response == "continue" else "denied",
            )

    def _respond_orphan(self, fd: int, events: int) -> None:
        """Respond to every pending notification of a listener fd that only the watchdog has."""
        notify, container_id = self.orphans[fd]
        if events & select.POLLIN:
            notification = notify.receive()
            if notification is not None:
                self._deliver(notify, notification.id)
                self.log.warning(
                    "watchdog_responded",
                    container=container_id,
                    pid=notification.pid,
                    nr=notification.nr,
                    reason="not_accepted",
                    action="allowed" if self.response == "continue" else "denied",
                    timeout=self.timeout,
                )
        elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            self._drop_orphan(fd)

    def _drop_orphan(self, fd: int) -> None:
        self.poller.unregister(fd)
        del self.orphans[fd]
        os.close(fd)

    def _deliver(self, notify: NotifyFd, notification_id: int) -> bool:
        if self.response == "continue":
            return notify.send_continue(notification_id)
        return notify.send_error(notification_id, errno.EPERM)

    def _respond(self, slot: int, watched: _Watched, notification_id: int, pid: int, nr: int, reason: str) -> None:
        # Count first, so that the count is visible to the supervisor before
        # the caller returns. Take it back if the response did not land.
        counter = self.table.base(slot) + WATCHDOG_RESPONSES
        self.table.words[counter] += 1
        try:
            delivered = self._deliver(watched.fd, notification_id)
        except OSError as exc:
            self.table.words[counter] -= 1
            self.log.error("watchdog_response_failed", container=watched.container_id, slot=slot, error=str(exc))
            return
        if not delivered:
            self.table.words[counter] -= 1
            return
        self.log.warning(
            "watchdog_responded",
            container=watched.container_id,
            pid=pid,
            nr=nr,
            reason=reason,
            action="allowed" if self.response == "continue" else "denied",
            timeout=self.timeout,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speaker.notify.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--table-fd", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--response", choices=("deny", "continue"), required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    args = parser.parse_args(argv)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != args.parent_pid:
        return 1
    # SIGINT and SIGTERM go to the whole process group from a terminal: the
    # watchdog outlives them until the supervisor closes the control socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    control = socket.socket(fileno=args.control_fd)
    listening = socket.socket(fileno=args.listen_fd)
    listening.setblocking(False)
    table = SlotTable(args.slots, fd=args.table_fd)
    Watchdog(control, listening, table, args.timeout, args.response).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
