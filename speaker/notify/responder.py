"""One listener fd and the thread that responds to its notifications.

The hot path (receive, one set lookup, CONTINUE) runs in a dedicated thread
per fd and never touches the event loop, so phase changes and other pipeline
work cannot delay a response except through the GIL. Everything that is not a
plain allow (denials, holds, complain reports) goes to the ``Judge``.

Two ways to wait for the next notification:

* ``block`` (Linux 6.6+, when SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP is set): the
  thread blocks in SECCOMP_IOCTL_NOTIF_RECV, which these kernels also end
  with ENOENT when the filter loses its last task. Stopping the thread takes
  a signal (``WAKE_SIGNAL``), which makes the ioctl fail with EINTR.
* ``poll``: older kernels never end a blocked RECV when the container exits,
  so the thread polls the fd together with an eventfd first. This costs one
  more syscall per notification.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import threading
from typing import TYPE_CHECKING, Protocol

from speaker.events import Phase
from speaker.notify.ioctl import Notification, NotifyFd
from speaker.notify.oci import ProcessState
from speaker.notify.slots import RECEIVED, RECEIVED_INFO, RELEASED, SlotTable

if TYPE_CHECKING:
    from speaker.notify.policy import PhasePolicy

#: Signal that interrupts a blocked RECV. Its default action is to ignore
#: it, so a stray SIGURG harms no thread that lacks the handler.
WAKE_SIGNAL = signal.SIGURG
_WORD_MASK = 0xFFFFFFFF


class ContainerState:
    """The phase a container is in, as every listener of that container reads it.

    ``keys`` is the set of decision keys that the container may use now:
    those of its phase, plus those of ``also`` during the running margin.
    ``allowed`` is ``keys`` without the syscalls that always take the slow
    path. The event loop replaces both (one reference store each) on every
    phase change, and the responders read ``allowed`` once per notification.
    """

    def __init__(self, container_id: str, policy: PhasePolicy | None) -> None:
        self.container_id = container_id
        self.policy = policy
        self.phase = Phase.BOOTING
        #: A second phase whose list is also allowed, during the switch to running.
        self.also: Phase | None = None
        self.keys: frozenset[int] = frozenset()
        self.allowed: frozenset[int] = frozenset()
        self.listeners: list[Listener] = []
        #: Whether Docker removed the container, so its state goes with its last listener.
        self.removed = False
        self.apply(Phase.BOOTING)

    def apply(self, phase: Phase, policy: PhasePolicy | None = None, also: Phase | None = None) -> None:
        if policy is not None:
            self.policy = policy
        self.phase = phase
        self.also = also
        if self.policy is None:
            self.keys = self.allowed = frozenset()
            return
        keys = self.policy.keys(phase)
        if also is not None:
            keys = keys | self.policy.keys(also)
        self.keys = keys
        self.allowed = keys - self.policy.exec_keys


class Judge(Protocol):
    """The decisions the fast path cannot make: denials, held notifications and complain-mode reports."""

    def judge(self, listener: Listener, notification: Notification) -> None:
        """Respond to ``notification`` or park it. Must not raise."""

    def listener_closed(self, listener: Listener) -> None:
        """Release the listener's slot and fd after its thread ends."""


@dataclasses.dataclass(eq=False)
class Listener:
    """One seccomp listener fd of a container (its init, or one ``docker exec``)."""

    fd: int
    container: ContainerState
    process: ProcessState
    slot: int
    #: (st_dev, st_ino) of the runtime init's executable, read when its execve
    #: was notified; None before that.
    runtime_exe: tuple[int, int] | None = None
    #: Whether the process that loaded the filter has executed its program.
    runtime_execed: bool = False
    mode: str = "poll"
    stopping: bool = False
    #: Notifications this listener's thread received, set when the thread ends.
    notifications: int = 0
    thread: threading.Thread | None = None
    wake_fd: int = -1

    def __post_init__(self) -> None:
        if self.mode == "poll":
            self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def start(self, judge: Judge, table: SlotTable) -> None:
        loop = self._run_blocking if self.mode == "block" else self._run_polling
        self.thread = threading.Thread(
            target=self._run,
            args=(loop, judge, table),
            name=f"notify-{self.container.container_id[:12]}-{self.process.pid}",
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to end; ``join`` waits for it."""
        self.stopping = True
        self.wake()

    def wake(self) -> None:
        thread = self.thread
        if self.mode == "poll":
            # The thread closes the eventfd on its way out.
            if self.wake_fd >= 0:
                try:
                    os.eventfd_write(self.wake_fd, 1)
                except OSError:
                    pass
        elif thread is not None and thread.ident is not None and thread.is_alive():
            try:
                signal.pthread_kill(thread.ident, WAKE_SIGNAL)
            except ProcessLookupError:
                pass

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end, waking it again every 50 ms. Returns whether it ended."""
        thread = self.thread
        if thread is None:
            return True
        waited = 0.0
        while thread.is_alive() and waited < timeout:
            # A signal that lands just before the thread enters RECV is lost,
            # so send it again until the thread is gone.
            self.wake()
            thread.join(0.05)
            waited += 0.05
        return not thread.is_alive()

    def _run(self, loop, judge: Judge, table: SlotTable) -> None:  # noqa: ANN001 - a bound method
        try:
            loop(judge, table)
        finally:
            judge.listener_closed(self)

    def _run_blocking(self, judge: Judge, table: SlotTable) -> None:
        notify = NotifyFd(self.fd)
        receive = notify.receive_fields
        send_continue = notify.send_continue
        words = table.words
        base = table.base(self.slot)
        container = self.container
        received = 0
        try:
            while not self.stopping:
                fields = receive()
                if fields is None:
                    if self._hung_up():
                        return
                    continue
                received += 1
                notification_id, pid, _flags, nr, audit_arch = fields
                words[base + RECEIVED] = notification_id
                words[base + RECEIVED_INFO] = (pid << 32) | (nr & _WORD_MASK)
                if ((audit_arch << 32) | (nr & _WORD_MASK)) in container.allowed:
                    send_continue(notification_id)
                else:
                    judge.judge(self, Notification(notification_id, pid, nr, audit_arch))
                words[base + RELEASED] = notification_id
        finally:
            self.notifications = received

    def _run_polling(self, judge: Judge, table: SlotTable) -> None:
        notify = NotifyFd(self.fd)
        receive = notify.receive_fields
        send_continue = notify.send_continue
        words = table.words
        base = table.base(self.slot)
        container = self.container
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        received = 0
        try:
            while not self.stopping:
                for fd, events in poller.poll():
                    if fd == self.wake_fd:
                        os.eventfd_read(self.wake_fd)
                        continue
                    if events & select.POLLIN:
                        fields = receive()
                        if fields is None:
                            continue
                        received += 1
                        notification_id, pid, _flags, nr, audit_arch = fields
                        words[base + RECEIVED] = notification_id
                        words[base + RECEIVED_INFO] = (pid << 32) | (nr & _WORD_MASK)
                        if ((audit_arch << 32) | (nr & _WORD_MASK)) in container.allowed:
                            send_continue(notification_id)
                        else:
                            judge.judge(self, Notification(notification_id, pid, nr, audit_arch))
                        words[base + RELEASED] = notification_id
                    elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        return
        finally:
            self.notifications = received

    def _hung_up(self) -> bool:
        """Return whether the filter has no tasks left, so no notification can come."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))

    def close(self) -> None:
        """Close the listener fd and the eventfd. Only after the thread has ended."""
        os.close(self.fd)
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
