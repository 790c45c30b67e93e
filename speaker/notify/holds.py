"""Notifications parked until a phase change or a deadline decides them.

The race this exists for: the application gets SIGTERM and starts shutting
down before Docker's kill event reaches SPEAKER. A shutdown-only syscall that
arrives in the running phase is therefore parked for up to the shutdown
grace. When the container enters shutdown, it is allowed; when the deadline
passes first, it is decided under the phase the container is then in.

A single keeper thread owns every hold. Each hold also occupies an entry in
the slot table, so that the watchdog responds to it if the keeper gets stuck.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from speaker.notify.ioctl import Notification, NotifyFd
from speaker.notify.responder import Listener
from speaker.notify.slots import HOLD_BASE, HOLDS_PER_SLOT, SlotTable


@dataclasses.dataclass(eq=False)
class Hold:
    """One parked notification.

    With ``responded`` set (complain mode), the syscall already ran and only
    its violation report waits: a phase change before the deadline drops it.
    """

    listener: Listener
    notification: Notification
    deadline: float
    responded: bool = False
    #: Index of the hold entry in the listener's slot, -1 for complain-mode reports.
    entry: int = -1


#: Decides a hold with the keeper's NotifyFd for its listener. Returns True
#: when the hold is finished (responded to or dropped), False to keep waiting.
Resolver = Callable[[Hold, NotifyFd, float], bool]


class HoldKeeper:
    """Re-decides parked notifications on every ``wake`` and at their deadlines."""

    def __init__(self, table: SlotTable, resolve: Resolver) -> None:
        self._table = table
        self._resolve = resolve
        self._condition = threading.Condition()
        self._holds: list[Hold] = []
        self._fds: dict[Listener, NotifyFd] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="notify-holds", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def park(self, hold: Hold) -> bool:
        """Park ``hold``. Returns False when the listener's slot has no free hold entry."""
        with self._condition:
            if not hold.responded:
                entry = self._free_entry(hold.listener)
                if entry < 0:
                    return False
                base = self._table.base(hold.listener.slot) + HOLD_BASE + 2 * entry
                words = self._table.words
                words[base] = hold.notification.id
                words[base + 1] = int(hold.deadline * 1e9)
                hold.entry = entry
            self._holds.append(hold)
            self._condition.notify()
        return True

    def _free_entry(self, listener: Listener) -> int:
        used = {hold.entry for hold in self._holds if hold.listener is listener}
        for entry in range(HOLDS_PER_SLOT):
            if entry not in used:
                return entry
        return -1

    def wake(self) -> None:
        """Re-decide every hold now, after a phase change."""
        with self._condition:
            self._condition.notify()

    def drop_listener(self, listener: Listener) -> int:
        """Drop the held notifications of a listener whose fd is about to close, and return their number."""
        with self._condition:
            kept = [hold for hold in self._holds if hold.listener is not listener]
            dropped = len(self._holds) - len(kept)
            for hold in self._holds:
                if hold.listener is listener:
                    self._release_entry(hold)
            self._holds = kept
            self._fds.pop(listener, None)
            return dropped

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(2.0)

    @property
    def pending(self) -> int:
        return len(self._holds)

    def _run(self) -> None:
        with self._condition:
            while not self._stopping:
                now = time.monotonic()
                remaining = []
                for hold in self._holds:
                    notify = self._fds.get(hold.listener)
                    if notify is None:
                        notify = self._fds[hold.listener] = NotifyFd(hold.listener.fd)
                    if self._resolve(hold, notify, now):
                        self._release_entry(hold)
                    else:
                        remaining.append(hold)
                self._holds = remaining
                timeout = min((hold.deadline for hold in remaining), default=now + 3600.0) - now
                self._condition.wait(max(timeout, 0.0))

    def _release_entry(self, hold: Hold) -> None:
        if hold.entry >= 0:
            base = self._table.base(hold.listener.slot) + HOLD_BASE + 2 * hold.entry
            self._table.words[base + 1] = 0
            hold.entry = -1
