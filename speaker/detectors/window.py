"""Ready when the per-second syscall sets stop changing: SPEAKER's original heuristic."""

from __future__ import annotations

import collections
import dataclasses
import math

from speaker.detectors.base import Detector, Readiness
from speaker.events import Event, SyscallCounts, SyscallRecord
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class WindowOptions:
    seconds: int = option(4, min=2, max=3600, help="Consecutive one-second slots whose syscall sets must be equal.")
    max_syscalls: int = option(
        8, min=1, max=1000, help="The equal sets must hold fewer than this many distinct syscalls."
    )


class Window(Detector):
    """Fire when ``seconds`` consecutive one-second slots have equal syscall sets of fewer than ``max_syscalls``.

    Slots are whole seconds of kernel record time, starting with the second
    in which the container started. A count with spans adds each syscall to
    the slots from its first call to its last. A count without spans adds all
    its syscalls to every slot that its interval reaches. Slots without syscalls have the
    empty set, so a server that sleeps without timers counts as steady.
    The readiness time is the end of the last slot of the window.
    """

    type_name = "window"
    Options = WindowOptions
    accepts = (SyscallCounts, SyscallRecord)

    def __init__(self, options: WindowOptions, started_at: float) -> None:
        super().__init__(options, started_at)
        self._slots: dict[int, set[str]] = collections.defaultdict(set)
        #: First slot not evaluated yet.
        self._next_slot = math.floor(started_at)
        self._recent: collections.deque[frozenset[str]] = collections.deque(maxlen=options.seconds)

    def observe(self, event: Event) -> Readiness | None:
        # NOTE: syscalls of a second that was already evaluated (they arrived
        # later than the caller's lag) are left out of the window.
        if isinstance(event, SyscallCounts):
            if event.spans:
                # Each syscall goes only into the slots between its own first and last call.
                for key, (first_time, last_time) in event.spans.items():
                    name = key.name or f"{key.arch}:{key.nr}"
                    for slot in range(max(math.floor(first_time), self._next_slot), math.floor(last_time) + 1):
                        self._slots[slot].add(name)
                return None
            first = max(math.floor(event.start_time), self._next_slot)
            last = math.floor(event.end_time)
            names = [key.name or f"{key.arch}:{key.nr}" for key in event.counts]
            for slot in range(first, last + 1):
                self._slots[slot].update(names)
        elif isinstance(event, SyscallRecord):
            slot = math.floor(event.record_time)
            if slot >= self._next_slot:
                self._slots[slot].add(event.name or f"{event.arch}:{event.nr}")
        return None

    def advance(self, now: float) -> Readiness | None:
        # Slot s is complete once every record before s + 1 has been observed.
        while self._next_slot + 1 <= now:
            slot = self._next_slot
            self._next_slot += 1
            current = frozenset(self._slots.pop(slot, ()))
            self._recent.append(current)
            if len(self._recent) < self.options.seconds or len(current) >= self.options.max_syscalls:
                continue
            if all(names == current for names in self._recent):
                reason = (
                    f"the syscall set stayed the same for {self.options.seconds} seconds "
                    f"with {len(current)} distinct syscalls"
                )
                return Readiness(float(slot + 1), self.type_name, reason)
        return None
