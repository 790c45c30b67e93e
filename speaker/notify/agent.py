"""The seccomp agent: it accepts listener fds, responds to notifications by phase, and reports violations.

This is the supervisor without the pipeline. Its threads:

* the acceptor, which receives listener fds from the runtime on the unix socket;
* one responder per listener fd (``speaker.notify.responder``);
* the hold keeper (``speaker.notify.holds``);

and one process, the watchdog (``speaker.notify.watchdog``). The pipeline
side calls ``set_phase`` and ``set_policy`` and collects ``Violation`` events
with ``take_violations`` after ``violations_ready`` becomes readable.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from speaker.events import Phase, Violation
from speaker.notify.handoff import Handoff, HandoffError, ListenerSocket
from speaker.notify.holds import Hold, HoldKeeper
from speaker.notify.ioctl import Notification, NotifyFd, arch_name
from speaker.notify.policy import PhasePolicy, decision_key, deny_errno, syscall_name
from speaker.notify.responder import WAKE_SIGNAL, ContainerState, Listener
from speaker.notify.slots import ACCEPTED, WATCHDOG_RESPONSES, SlotTable
from speaker.notify.watchdog import WatchdogClient

NEXT_PHASE = {Phase.BOOTING: Phase.RUNNING, Phase.RUNNING: Phase.SHUTDOWN, Phase.SHUTDOWN: None}
#: Violations kept for the pipeline before new ones are counted and dropped.
MAX_QUEUED_VIOLATIONS = 100_000


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    socket_path: Path
    #: ``enforce`` denies, ``complain`` allows and reports.
    mode: str = "enforce"
    #: ``errno`` fails a denied syscall with EPERM, ``kill`` also kills its process.
    deny_action: str = "errno"
    #: Seconds a running-phase notification that shutdown allows waits for the stop.
    shutdown_grace: float = 2.0
    #: Seconds a booting-phase notification that running allows waits for running.
    running_grace: float = 2.0
    #: Seconds after which the watchdog responds to a notification in place of the supervisor.
    response_timeout: float = 1.0
    max_listeners: int = 1024
    #: Use blocking RECV where the kernel supports it (faster), else always poll.
    blocking_receive: bool = True


class NotifyAgent:
    """The socket, listeners, held notifications and watchdog of one supervisor."""

    def __init__(self, settings: AgentSettings, log: Any) -> None:
        self.settings = settings
        self.log = log
        self.policy: PhasePolicy | None = None
        self.containers: dict[str, ContainerState] = {}
        self.table = SlotTable(settings.max_listeners)
        self.keeper = HoldKeeper(self.table, self._resolve_hold)
        self.watchdog = WatchdogClient(
            self.table, settings.response_timeout, "continue" if settings.mode == "complain" else "deny"
        )
        self.socket = ListenerSocket(settings.socket_path)
        self._lock = threading.Lock()
        self._free_slots = list(range(settings.max_listeners - 1, -1, -1))
        self._listeners: set[Listener] = set()
        self._violations: collections.deque[Violation] = collections.deque()
        self.dropped_violations = 0
        #: Readable (an eventfd) while violations wait in ``take_violations``.
        self.violations_ready = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._acceptor_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._acceptor = threading.Thread(target=self._accept_loop, name="notify-acceptor", daemon=True)
        self._stopping = False
        self._blocking = False
        self._seen: set[tuple[str, Phase, str]] = set()
        self._watchdog_responses_seen = 0
        #: Watchdog responses counted in the slots of listeners that have closed.
        self._watchdog_responses_closed = 0
        self.handoffs = 0

    # --- Lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Open the socket and start the watchdog and the threads. Call from the main thread."""
        self._blocking = self.settings.blocking_receive and _install_wake_handler()
        self.socket.open()
        self.watchdog.start(self.socket.fileno())
        self.keeper.start()
        self._acceptor.start()
        self.log.info(
            "supervisor_listening",
            socket=str(self.settings.socket_path),
            mode=self.settings.mode,
            watchdog_pid=self.watchdog.process.pid if self.watchdog.process else None,
        )

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, end every responder and close every listener fd.

        From then on the containers' notified syscalls fail with ENOSYS.
        A second call does nothing.
        """
        if self._stopping:
            return
        self._stopping = True
        os.eventfd_write(self._acceptor_wake, 1)
        if self._acceptor.is_alive():
            self._acceptor.join(timeout)
        self.socket.close()
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener.stop()
        for listener in listeners:
            if not listener.join(timeout):
                self.log.error(
                    "responder_not_stopped", container=listener.container.container_id, pid=listener.process.pid
                )
        self.keeper.stop()
        self.watchdog.stop()
        self.check_watchdog()
        os.close(self._acceptor_wake)

    def close(self) -> None:
        """Stop, then release the shared memory and the violations eventfd. Take the violations first."""
        self.stop()
        self.table.close()
        os.close(self.violations_ready)

    # --- Pipeline side --------------------------------------------------------

    def set_policy(self, policy: PhasePolicy, container_id: str = "") -> None:
        """Use ``policy`` for ``container_id``, or as the default for every container when empty."""
        with self._lock:
            if not container_id:
                self.policy = policy
                targets = [state for state in self.containers.values() if state.policy is None]
            else:
                targets = [self._container(container_id)]
            for state in targets:
                state.apply(state.phase, policy, state.also)
        self.keeper.wake()

    def set_phase(self, container_id: str, phase: Phase, also: Phase | None = None) -> bool:
        """Switch a container to ``phase``, also allowing the list of ``also`` if given.

        Returns False when nothing changed.
        """
        with self._lock:
            state = self._container(container_id)
            if state.phase is phase and state.also is also and state.policy is not None:
                return False
            state.apply(phase, also=also)
        self.keeper.wake()
        return True

    def phase_of(self, container_id: str) -> Phase | None:
        state = self.containers.get(container_id)
        return state.phase if state is not None else None

    def forget(self, container_id: str) -> None:
        """Drop a removed container's state now, or when its last listener closes."""
        with self._lock:
            state = self.containers.get(container_id)
            if state is None:
                return
            state.removed = True
            if not state.listeners:
                del self.containers[container_id]

    def take_violations(self) -> list[Violation]:
        try:
            os.eventfd_read(self.violations_ready)
        except BlockingIOError:
            pass
        taken = []
        while self._violations:
            taken.append(self._violations.popleft())
        return taken

    def check_watchdog(self) -> int:
        """Log how many notifications the watchdog responded to since the last call, and return that number."""
        with self._lock:
            slots = [listener.slot for listener in self._listeners]
            total = self._watchdog_responses_closed
        for slot in slots:
            total += self.table.words[self.table.base(slot) + WATCHDOG_RESPONSES]
        new = total - self._watchdog_responses_seen
        if new > 0:
            self._watchdog_responses_seen = total
            self.log.warning("watchdog_intervened", responses=new, total=total)
        return new

    def _container(self, container_id: str) -> ContainerState:
        state = self.containers.get(container_id)
        if state is None:
            state = self.containers[container_id] = ContainerState(container_id, self.policy)
        return state

    # --- Acceptor -------------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        poller.register(self._acceptor_wake, select.POLLIN)
        while not self._stopping:
            for fd, _events in poller.poll():
                if fd == self._acceptor_wake or self._stopping:
                    continue
                try:
                    handoff = self.socket.accept(timeout=self.settings.response_timeout * 5)
                except BlockingIOError:
                    continue
                except HandoffError as exc:
                    self.table.words[ACCEPTED] += 1
                    self.log.warning("handoff_rejected", error=str(exc))
                    continue
                except OSError as exc:
                    self.table.words[ACCEPTED] += 1
                    self.log.error("handoff_failed", error=str(exc))
                    continue
                # The watchdog takes over waiting connections only while this count stays the same.
                self.table.words[ACCEPTED] += 1
                try:
                    self._attach(handoff)
                except Exception as exc:  # keep accepting: another container may still arrive
                    os.close(handoff.fd)
                    self.log.error(
                        "listener_attach_failed",
                        container=handoff.state.container_id,
                        pid=handoff.state.pid,
                        error=f"{type(exc).__name__}: {exc}",
                    )

    def _attach(self, handoff: Handoff) -> None:
        state = handoff.state
        mode = "poll"
        if NotifyFd(handoff.fd).set_sync_wake_up() and self._blocking:
            mode = "block"
        with self._lock:
            if not self._free_slots:
                raise OSError(errno.ENOSPC, f"all {self.settings.max_listeners} listener slots are in use")
            slot = self._free_slots.pop()
            container = self._container(state.container_id)
            listener = Listener(
                fd=handoff.fd,
                container=container,
                process=state,
                slot=slot,
                mode=mode,
            )
            container.listeners.append(listener)
            self._listeners.add(listener)
            self.handoffs += 1
        self.table.clear(slot)
        try:
            self.watchdog.add(slot, handoff.fd, state.container_id)
        except OSError as exc:
            self.log.error("watchdog_unreachable", container=state.container_id, error=str(exc))
        listener.start(self, self.table)
        self.log.info(
            "listener_attached",
            container=state.container_id,
            pid=state.pid,
            status=state.status,
            phase=container.phase.value,
            receive=mode,
            metadata=state.metadata or None,
        )

    def listener_closed(self, listener: Listener) -> None:
        dropped = self.keeper.drop_listener(listener)
        self.watchdog.remove(listener.slot)
        listener.close()
        with self._lock:
            self._watchdog_responses_closed += self.table.words[self.table.base(listener.slot) + WATCHDOG_RESPONSES]
            self._listeners.discard(listener)
            container = listener.container
            if listener in container.listeners:
                container.listeners.remove(listener)
            if container.removed and not container.listeners:
                self.containers.pop(container.container_id, None)
            self._free_slots.append(listener.slot)
        self.log.info(
            "listener_closed",
            container=listener.container.container_id,
            pid=listener.process.pid,
            notifications=listener.notifications,
            held_dropped=dropped,
            reason="supervisor stopping" if listener.stopping else "no task uses the filter any more",
        )

    # --- Decisions ------------------------------------------------------------

    def judge(self, listener: Listener, notification: Notification) -> None:
        """Decide a notification that the current phase's set did not allow, from the responder thread."""
        notify = NotifyFd(listener.fd)
        try:
            self._judge(listener, notification, notify, time.monotonic())
        except Exception as exc:
            # Fail closed: a response must go out, or the caller waits for the watchdog.
            self.log.error(
                "judge_failed",
                container=listener.container.container_id,
                pid=notification.pid,
                error=f"{type(exc).__name__}: {exc}",
            )
            try:
                notify.send_error(notification.id, errno.EPERM)
            except OSError:
                pass

    def _judge(self, listener: Listener, notification: Notification, notify: NotifyFd, now: float) -> None:
        container = listener.container
        policy = container.policy
        key = decision_key(notification.audit_arch, notification.nr)
        if policy is None:
            hold = Hold(listener, notification, now + self.settings.response_timeout / 2)
            if not self.keeper.park(hold):
                self._violate(listener, notification, notify, container.phase)
            return
        runtime_init = self.is_runtime_init(listener, notification, key in policy.exec_keys)
        phase = container.phase
        if key in container.keys or (runtime_init and key in policy.keys(Phase.BOOTING)):
            notify.send_continue(notification.id)
            return
        grace = self._grace(phase)
        following = NEXT_PHASE[phase]
        if grace > 0 and following is not None and key in policy.keys(following):
            if self.settings.mode == "complain":
                notify.send_continue(notification.id)
                comm = _read_comm(notification.pid)
                self.keeper.park(_ComplainHold(listener, notification, now + grace, responded=True, phase=phase, comm=comm))
                return
            if self.keeper.park(Hold(listener, notification, now + grace)):
                return
        self._violate(listener, notification, notify, phase)

    def _grace(self, phase: Phase) -> float:
        if phase is Phase.RUNNING:
            return self.settings.shutdown_grace
        if phase is Phase.BOOTING:
            return self.settings.running_grace
        return 0.0

    def _resolve_hold(self, hold: Hold, notify: NotifyFd, now: float) -> bool:
        """Decide a held notification from the keeper thread; see holds.Resolver."""
        try:
            return self._decide_hold(hold, notify, now)
        except Exception as exc:
            # Fail closed, and keep the keeper thread alive for the other holds.
            self.log.error(
                "hold_decision_failed",
                container=hold.listener.container.container_id,
                pid=hold.notification.pid,
                error=f"{type(exc).__name__}: {exc}",
            )
            if not hold.responded:
                try:
                    notify.send_error(hold.notification.id, errno.EPERM)
                except OSError:
                    pass
            return True

    def _decide_hold(self, hold: Hold, notify: NotifyFd, now: float) -> bool:
        container = hold.listener.container
        policy = container.policy
        notification = hold.notification
        if policy is not None and decision_key(notification.audit_arch, notification.nr) in container.keys:
            if not hold.responded:
                notify.send_continue(notification.id)
            return True
        if now < hold.deadline:
            return False
        if isinstance(hold, _ComplainHold):
            self._report(hold.listener, notification, hold.phase, hold.comm, "allowed")
            return True
        self._violate(hold.listener, notification, notify, container.phase)
        return True

    def _violate(self, listener: Listener, notification: Notification, notify: NotifyFd, phase: Phase) -> None:
        comm = _read_comm(notification.pid)
        kill = self.settings.mode == "enforce" and self.settings.deny_action == "kill"
        pidfd = _open_process(notification.pid) if kill else -1
        try:
            # The comm and the pidfd are the caller's only if the notification
            # is still valid: a dead caller's pid may belong to another process.
            if not notify.id_valid(notification.id):
                return
            # Report first, so that the violation is queued before the caller
            # sees the result of its syscall or dies.
            if self.settings.mode == "complain":
                self._report(listener, notification, phase, comm, "allowed")
                notify.send_continue(notification.id)
                return
            self._report(listener, notification, phase, comm, "killed" if kill else "denied")
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            notify.send_error(notification.id, deny_errno(notification.audit_arch, notification.nr))
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _report(self, listener: Listener, notification: Notification, phase: Phase, comm: str, action: str) -> None:
        arch = arch_name(notification.audit_arch, notification.nr)
        name = syscall_name(arch, notification.nr)
        container_id = listener.container.container_id
        violation = Violation(
            container_id=container_id,
            phase=phase,
            pid=notification.pid,
            comm=comm,
            syscall=name,
            arch=arch,
            action=action,
            nr=notification.nr,
        )
        if len(self._violations) >= MAX_QUEUED_VIOLATIONS:
            self.dropped_violations += 1
        else:
            self._violations.append(violation)
            os.eventfd_write(self.violations_ready, 1)
        first = (container_id, phase, name)
        if first not in self._seen:
            self._seen.add(first)
            self.log.warning(
                "syscall_violation",
                container=container_id,
                phase=phase.value,
                syscall=name,
                arch=arch,
                pid=notification.pid,
                comm=comm,
                action=action,
                note="first of its kind; later ones go to the violations sink only",
            )

    def is_runtime_init(self, listener: Listener, notification: Notification, is_exec: bool) -> bool:
        """Return whether the caller is the runtime's init, before it executed the container's program.

        runc loads the filter before it executes the entrypoint (or the
        ``docker exec`` command), so its last setup syscalls pass through the
        filter. They belong to booting whatever the container's phase. The
        caller is the runtime's init if it belongs to the thread group that
        loaded the filter (the pid in the handoff) and that group has not
        executed a program yet.

        The fd arrives too late to read the init's executable at handoff: runc
        lets the init go on as soon as it has sent the fd. So every execve
        reaches this method (EXEC_SYSCALLS never take the fast path). The
        init's own execve records its executable, which the init cannot
        change, and the first notification from that group with another
        executable marks the program as started.
        """
        policy = listener.container.policy
        if listener.runtime_execed or policy is None or not policy.runtime_rule:
            return False
        if _thread_group(notification.pid) != listener.process.pid:
            return False
        if listener.runtime_exe is None:
            if is_exec:
                # The caller waits for this response, so its executable is still the runtime's.
                listener.runtime_exe = _exe_identity(notification.pid)
            return True
        if _exe_identity(notification.pid) == listener.runtime_exe:
            return True
        listener.runtime_execed = True
        return False


@dataclasses.dataclass(eq=False)
class _ComplainHold(Hold):
    """A complain-mode report that waits for the next phase before it counts."""

    phase: Phase = Phase.RUNNING
    comm: str = ""


def _install_wake_handler() -> bool:
    """Give WAKE_SIGNAL a no-op handler, so that it interrupts a blocked RECV with EINTR.

    Python installs handlers without SA_RESTART, which is what makes the
    ioctl return. Returns False outside the main thread, where Python cannot
    install handlers; the responders then poll.
    """
    try:
        current = signal.getsignal(WAKE_SIGNAL)
        if current in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(WAKE_SIGNAL, _ignore_signal)
        return True
    except ValueError:
        return False


def _ignore_signal(signum: int, frame: Any) -> None:
    return None


def _read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as file:
            return file.read().rstrip(b"\n").decode(errors="replace")
    except OSError:
        return ""


def _thread_group(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _exe_identity(pid: int) -> tuple[int, int] | None:
    try:
        info = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _open_process(tid: int) -> int:
    """Return a pidfd for the whole process of thread ``tid``, or -1 when it is gone.

    SIGKILL through it ends every thread, as SCMP_ACT_KILL_PROCESS would.
    """
    target = _thread_group(tid)
    if target <= 0:
        return -1
    try:
        return os.pidfd_open(target)
    except OSError:
        return -1
