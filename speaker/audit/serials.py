"""Find lost audit records from gaps in their serial numbers.

The kernel numbers audit events from one global counter. Every record of
one event shares the event's serial (a SYSCALL record, its PATH and
PROCTITLE records, and the EOE that ends it), and every kernel record goes to
the multicast group and to auditd. So a serial that never arrives means a
lost record, whatever its type. Records can arrive slightly out of order:
in a real trace here, 6 of 1.67 million SECCOMP records came one place late,
and the PROCTITLE record of a multi-record event came 41 serials late. A
missing serial is therefore a *hole* first, and only a hole that stays open
for ``grace`` seconds counts as lost.

auditd's own records (DAEMON_START and so on) have numbers from auditd's
counter instead, so callers must leave them out.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Iterable


@dataclasses.dataclass
class _Hole:
    first: int
    last: int
    #: ``time.monotonic()`` when the hole was found.
    found: float
    reason: str


class SerialTracker:
    """Track the highest serial seen and the holes below it.

    ``top`` is None until the first serial arrives. Serials below the first
    one belong to events that began before the trace and are ignored.
    """

    def __init__(self, grace: float = 2.0) -> None:
        self.grace = grace
        self.top: int | None = None
        # Open holes sorted by ``first``; they never overlap.
        self._holes: list[_Hole] = []
        self._next_reason = "serial_gap"

    def extends(self, first: int) -> bool:
        """Return whether a run starting at ``first`` continues right after ``top``."""
        return self.top is not None and first == self.top + 1

    def add_run(self, first: int, last: int) -> None:
        """Record the consecutive serials ``first..last``, which must continue right after ``top``."""
        if not self.extends(first) or last < first:
            raise ValueError(f"the run {first}..{last} does not continue after serial {self.top}")
        self.top = last

    def add(self, serials: Iterable[int], now: float | None = None) -> None:
        """Record serials in arrival order; duplicates (records of one event) are allowed."""
        found = time.monotonic() if now is None else now
        top = self.top
        for serial in serials:
            if top is None:
                top = serial
            elif serial == top + 1:
                top = serial
            elif serial > top:
                # TODO: a trace that outlives a wrap of the 32-bit counter reports one huge gap.
                self._holes.append(_Hole(top + 1, serial - 1, found, self._next_reason))
                top = serial
            elif self._holes and serial >= self._holes[0].first:
                self._fill(serial)
            self._next_reason = "serial_gap"
        self.top = top

    def expect_gap(self, reason: str) -> None:
        """Give ``reason`` to a hole right before the next serial, and confirm that hole without waiting.

        For a loss the caller knows the cause of, such as deleted log files.
        """
        self._next_reason = reason

    def confirm(self, now: float | None = None, final: bool = False) -> dict[str, int]:
        """Return the number of serials lost per reason, for holes older than ``grace`` (all holes when ``final``)."""
        current = time.monotonic() if now is None else now
        lost: dict[str, int] = {}
        still_open = []
        for hole in self._holes:
            if final or hole.reason != "serial_gap" or current - hole.found >= self.grace:
                lost[hole.reason] = lost.get(hole.reason, 0) + hole.last - hole.first + 1
            else:
                still_open.append(hole)
        self._holes = still_open
        return lost

    @property
    def open_holes(self) -> int:
        """Return the number of serials that are missing but still within ``grace``."""
        return sum(hole.last - hole.first + 1 for hole in self._holes)

    def _fill(self, serial: int) -> None:
        index = bisect.bisect_right(self._holes, serial, key=lambda hole: hole.first) - 1
        if index < 0:
            return
        hole = self._holes[index]
        if serial > hole.last:
            return
        pieces = []
        if hole.first < serial:
            pieces.append(_Hole(hole.first, serial - 1, hole.found, hole.reason))
        if serial < hole.last:
            pieces.append(_Hole(serial + 1, hole.last, hole.found, hole.reason))
        self._holes[index : index + 1] = pieces
