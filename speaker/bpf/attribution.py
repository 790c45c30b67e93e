"""Turn the kernel's per-cgroup slot counts into SyscallCounts events per container and slot."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterable
from typing import Any

from speaker.bpf.cgroups import CgroupNames
from speaker.bpf.clock import wall_offset
from speaker.bpf.output import CgroupSeen, SlotCount
from speaker.bpf.program import STRING_LENGTH
from speaker.bpf.signals import SignalSlots
from speaker.events import SyscallCounts, SyscallKey

#: Minimum seconds between two scans of the cgroup hierarchy for unknown ids.
RESCAN_INTERVAL = 1.0
#: Seconds that counts of an unknown cgroup wait for its path before they are dropped.
UNKNOWN_HOLD = 3.0


class CountAttribution:
    """Container ids for printed counts, and the SyscallCounts events made from them.

    Counts of a cgroup whose path is not known yet wait up to UNKNOWN_HOLD
    seconds for a ``cgroup`` line or a scan that names it. ``unattributed``
    counts the syscalls that were dropped after that.
    """

    def __init__(
        self, names: CgroupNames, slot_ns: int, source: str, log: Any, signal_slots: SignalSlots | None = None
    ) -> None:
        self.names = names
        self.slot_ns = slot_ns
        self.signal_slots = signal_slots or SignalSlots(slot_ns)
        self.source = source
        self.log = log
        #: Syscalls by outcome: ``counted`` (sent for a container), ``host``
        #: (cgroups of no container) and ``unattributed`` (path never found).
        self.stats: collections.Counter[str] = collections.Counter()
        self.containers: set[str] = set()
        #: Counts of unknown cgroups, with the monotonic time they arrived.
        self._unknown: dict[int, tuple[float, list[SlotCount]]] = {}
        self._last_scan = -math.inf

    def add_cgroup(self, seen: CgroupSeen) -> None:
        """Record the path of a cgroup made or removed while the program ran."""
        # bpftrace cuts strings at STRING_LENGTH - 1 bytes, and the id is at
        # the end of the path. So a cut path is left to a scan instead.
        # TODO: a cgroup with a cut path that is removed before the next scan
        # stays unknown, and its counts are dropped as unattributed.
        if len(seen.path.encode()) < STRING_LENGTH - 1:
            self.names.add(seen.cgroup_id, seen.path)

    def events(self, counts: Iterable[SlotCount]) -> list[SyscallCounts]:
        """Return one event per container and slot for ``counts``, holding those of unknown cgroups."""
        by_cgroup: dict[int, list[SlotCount]] = collections.defaultdict(list)
        for entry in counts:
            by_cgroup[entry.cgroup_id].append(entry)
        events: list[SyscallCounts] = []
        for cgroup_id, entries in by_cgroup.items():
            container = self._container_of(cgroup_id)
            if container is None:
                waiting = self._unknown.setdefault(cgroup_id, (time.monotonic(), []))
                waiting[1].extend(entries)
            elif container:
                events.extend(self._events_for(container, entries))
            else:
                self.stats["host"] += sum(entry.count for entry in entries)
        return events

    def release(self, final: bool) -> list[SyscallCounts]:
        """Return events for held counts whose cgroup is now known, and drop those held too long.

        With ``final``, every held count is resolved or dropped.
        """
        events: list[SyscallCounts] = []
        now = time.monotonic()
        for cgroup_id in list(self._unknown):
            arrived, entries = self._unknown[cgroup_id]
            container = self.names.container_id(cgroup_id)
            if container is None and not final and now - arrived < UNKNOWN_HOLD:
                continue
            del self._unknown[cgroup_id]
            total = sum(entry.count for entry in entries)
            if container:
                events.extend(self._events_for(container, entries))
            elif container == "":
                self.stats["host"] += total
            else:
                self.stats["unattributed"] += total
                self.log.warning(
                    "cgroup_unknown",
                    cgroup=cgroup_id,
                    syscalls=total,
                    consequence="the cgroup was removed before its path was read, so its counts are dropped",
                )
        return events

    @property
    def holding(self) -> bool:
        return bool(self._unknown)

    def _container_of(self, cgroup_id: int) -> str | None:
        container = self.names.container_id(cgroup_id)
        if container is None and time.monotonic() - self._last_scan >= RESCAN_INTERVAL:
            self._last_scan = time.monotonic()
            self.names.scan()
            container = self.names.container_id(cgroup_id)
        return container

    def _events_for(self, container: str, entries: list[SlotCount]) -> list[SyscallCounts]:
        if container not in self.containers:
            self.containers.add(container)
            self.log.info("container_counted", container=container[:12])
        by_slot: dict[int, dict[SyscallKey, int]] = collections.defaultdict(dict)
        for entry in entries:
            counts = by_slot[entry.slot]
            key = SyscallKey(0, entry.arch, entry.nr)
            counts[key] = counts.get(key, 0) + entry.count
            self.stats["counted"] += entry.count

        # Slots are in CLOCK_MONOTONIC time, which bpftrace's nsecs reads.
        slot_seconds = self.slot_ns / 1e9
        now = time.monotonic()
        offset = wall_offset()
        events = []
        for slot in sorted(by_slot):
            start = slot * slot_seconds + offset
            end = min((slot + 1) * slot_seconds, now) + offset
            counts = by_slot[slot]
            spans = {}
            if self.signal_slots.marked(container, slot):
                spans = {key: (start, end) for key in counts}
            events.append(
                SyscallCounts(
                    container_id=container,
                    start_time=start,
                    end_time=end,
                    counts=counts,
                    spans=spans,
                    source=self.source,
                )
            )
        return events
