"""Shared memory that shows the watchdog process which notifications still wait for the supervisor.

The table is u64 words in a memfd that both processes map. It starts with
a header of HEADER_WORDS words:

====  =================================================================
word  contents
====  =================================================================
0     number of connections the supervisor has accepted on its socket
====  =================================================================

Then comes one slot per listener fd:

====  =================================================================
word  contents
====  =================================================================
0     id of the last notification the responder received
1     id of the last notification the responder released (responded to,
      or parked in the hold table). It equals word 0 when nothing is in flight
2     ``pid << 32 | nr`` of the last received notification, for the log
3     number of notifications the watchdog responded to (written by the watchdog)
8+2k  hold k: notification id
9+2k  hold k: deadline in CLOCK_MONOTONIC nanoseconds, 0 when the hold is free
====  =================================================================

The responder writes words 0 to 2 on its hot path, three 8-byte stores, so
the watchdog needs no message per notification. Aligned 8-byte stores are atomic
on x86_64, so a reader never sees half a word.
"""

from __future__ import annotations

import mmap
import os

HEADER_WORDS = 8
ACCEPTED = 0
# NOTE: a listener whose 17th notification would be held gets it decided at
# once instead (denied in running), because the watchdog can track only this many.
HOLDS_PER_SLOT = 16
SLOT_WORDS = 8 + 2 * HOLDS_PER_SLOT
RECEIVED = 0
RELEASED = 1
RECEIVED_INFO = 2
WATCHDOG_RESPONSES = 3
HOLD_BASE = 8


class SlotTable:
    """A table of ``count`` slots in shared memory, created by the supervisor and mapped by the watchdog."""

    def __init__(self, count: int, fd: int | None = None) -> None:
        self.count = count
        size = (HEADER_WORDS + count * SLOT_WORDS) * 8
        if fd is None:
            fd = os.memfd_create("speaker-notify-slots", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        #: The table as u64 words: the header, then word n of a slot at ``base(slot) + n``.
        self.words = memoryview(self._map).cast("Q")

    def base(self, slot: int) -> int:
        """Return the index of the slot's first word in ``words``."""
        if not 0 <= slot < self.count:
            raise IndexError(f"slot {slot} is outside the table of {self.count} slots")
        return HEADER_WORDS + slot * SLOT_WORDS

    def clear(self, slot: int) -> None:
        base = self.base(slot)
        self.words[base : base + SLOT_WORDS] = memoryview(bytes(SLOT_WORDS * 8)).cast("Q")

    def close(self) -> None:
        self.words.release()
        self._map.close()
        os.close(self.fd)
