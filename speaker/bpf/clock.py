"""Convert the kernel times that the bpftrace program prints to wall-clock times."""

from __future__ import annotations

import time


def wall_offset() -> float:
    """Return the wall-clock time minus CLOCK_MONOTONIC, in seconds, as of now.

    bpftrace's ``nsecs`` reads CLOCK_MONOTONIC, the clock of
    ``time.monotonic()`` on Linux. A clock step changes the offset, so read
    it again for each batch of times, and once for times that must keep their
    spacing.
    """
    return time.time() - time.monotonic()


def monotonic_to_wall(seconds: float) -> float:
    """Return the wall-clock time (seconds since the epoch) of a CLOCK_MONOTONIC time."""
    return seconds + wall_offset()
