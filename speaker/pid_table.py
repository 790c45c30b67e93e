"""Map host pids to containers over time, for records read after their process is gone.

Audit records name a process by its host pid (the thread group id), and they
reach SPEAKER some time after the syscall. By then a short-lived process may
have exited, and on a host with a small ``pid_max`` its pid may even belong to
a new process. So the table keeps, per pid, a short history of *lives*: when
each process with that pid was born, when it died, and which container it was
in. A record is matched to the life that contains its kernel time.

Lives come from:

* fork, exec and exit events of the proc connector (``speaker.proc_connector``),
  when available. A child inherits its parent's container; otherwise its
  cgroup is read right after the fork, while the process still exists;
* reading /proc/PID/cgroup when a record arrives for a pid the table does not
  know, which works while the process lives;
* pids that other events report, such as a container's init pid.

A record whose life cannot be found is *unattributable*: the caller decides
whether it could have come from a traced container.
"""

from __future__ import annotations

import dataclasses
import math
import time

from speaker.container_cgroups import CgroupResolver, ProcessGone, start_time

#: Tolerance in seconds when comparing times of different clocks: audit's
#: coarse clock runs up to one jiffy behind, and /proc's start times have
#: clock-tick (10 ms) resolution.
SLACK = 0.05
#: Lives kept per pid; older ones are dropped first.
MAX_LIVES = 4
#: Generations of recorded forks followed to find a container.
MAX_ANCESTORS = 8
#: Stands for "not known yet" in ``Life.container``.
UNKNOWN = None


@dataclasses.dataclass
class Life:
    """One process that had a given pid."""

    #: Container id, "" for a host process, None while unknown.
    container: str | None
    #: Wall-clock birth time, -inf when unknown.
    born: float = -math.inf
    #: Wall-clock death time, inf while alive or unknown.
    died: float = math.inf
    #: ``time.monotonic()`` of the last check against /proc.
    checked: float = -math.inf
    #: Pid of the parent that forked it, 0 when unknown.
    parent: int = 0


class PidTable:
    """Lives of host pids, fed by process events and /proc reads."""

    def __init__(self, resolver: CgroupResolver, *, revalidate_after: float = 1.0) -> None:
        self.resolver = resolver
        self.lives: dict[int, list[Life]] = {}
        #: Lives last checked before this monotonic time are checked again
        #: against /proc before use, in case their pid was reused unseen.
        self.trusted_since = -math.inf
        #: Seconds after which a life is checked again when no process
        #: events arrive; ``inf`` while a proc connector reports every fork.
        self.revalidate_after = revalidate_after
        self.boot_wall_time = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        self.proc_reads = 0

    # --- Process events ---------------------------------------------------

    def forked(self, child: int, parent: int, when: float) -> None:
        """Record a new process ``child`` (a thread group id) forked by ``parent`` at wall time ``when``.

        TODO: a child that exits before its fork event is read, and whose
        parent is gone too (runc's init helpers, say), stays unattributed, so
        its records count as lost when a traced container was running.
        """
        parent_life = self._life_during(parent, when, when)
        container = parent_life.container if parent_life is not None else UNKNOWN
        if not container:
            # The parent is unknown or on the host. The child's cgroup is what
            # counts, because a runtime may have moved it into a container.
            container = self._read_container(child)
        if container is UNKNOWN:
            # The child is already gone, so it gets its parent's cgroup, which it
            # inherited. Only a runtime's own helpers move between cgroups.
            container = self._parent_container(parent, parent_life, when)
        self._add(child, Life(container, born=when, checked=time.monotonic(), parent=parent))

    def _parent_container(self, parent: int, life: Life | None, when: float) -> str | None:
        """Return the container a gone child inherited from ``parent``, or None when that is unsure."""
        if life is not None and life.container:
            return life.container
        # A living parent's cgroup now is the one it had at the fork, because
        # processes move into containers, never out. A recorded host life of
        # a gone parent may be stale: runc moves its init after the fork.
        container = self._read_container(parent)
        if container is UNKNOWN:
            return self._ancestor_container(life)
        if life is None:
            self._add(parent, Life(container, born=self._born(parent, when), checked=time.monotonic()))
        else:
            life.container = container
            life.checked = time.monotonic()
        return container

    def _ancestor_container(self, life: Life | None) -> str | None:
        """Return the container of the nearest ancestor in a container, following recorded forks.

        A process inherits its cgroup, and runtimes move processes into
        containers, never out, so a container found this way is sound. A host
        ancestor proves nothing, because a runtime may have moved a
        descendant, so the walk then returns None (unknown).
        """
        for _ in range(MAX_ANCESTORS):
            if life is None or not life.parent:
                return UNKNOWN
            life = self._life_during(life.parent, life.born, life.born)
            if life is not None and life.container:
                return life.container
        return UNKNOWN

    def execed(self, pid: int, when: float) -> None:
        """Read the cgroup of ``pid`` again after an exec, which is when a runtime's init becomes the entrypoint."""
        container = self._read_container(pid)
        life = self._newest(pid)
        if container is UNKNOWN:
            return
        if life is None or life.died < math.inf:
            self._add(pid, Life(container, born=self._born(pid, when), checked=time.monotonic()))
        else:
            life.container = container
            life.checked = time.monotonic()

    def exited(self, pid: int, when: float) -> None:
        life = self._newest(pid)
        if life is not None and life.died == math.inf:
            life.died = when

    def seen(self, pid: int, container: str, when: float) -> None:
        """Note that ``pid`` was in ``container`` at wall time ``when``, as another event reported."""
        life = self._life_during(pid, when, when)
        if life is None:
            self._add(pid, Life(container, born=-math.inf if pid not in self.lives else when))
        elif life.container is UNKNOWN:
            life.container = container
        elif life.container != container:
            # A fork went unseen: a new process has the pid since at most ``when``.
            life.died = min(life.died, when)
            self._add(pid, Life(container, born=when))

    # --- Lookup -----------------------------------------------------------

    def container_at(self, pid: int, start: float, end: float) -> str | None:
        """Return the container of ``pid`` for a record interval, "" for the host, None if unattributable.

        ``start`` and ``end`` bound the interval in which the pid's records lie
        (the interval of a whole SyscallCounts event).
        """
        life = self._life_during(pid, start, end)
        now = time.monotonic()
        if life is not None and life.container is not UNKNOWN:
            stale = life.checked < self.trusted_since or now - life.checked > self.revalidate_after
            if not stale or life.died < math.inf:
                return life.container
        return self._lookup_proc(pid, end, life, now)

    def _lookup_proc(self, pid: int, end: float, life: Life | None, now: float) -> str | None:
        """Attribute a record at ``end`` by the process that has ``pid`` now, if that is the same process."""
        self.proc_reads += 1
        try:
            born = self.boot_wall_time + start_time(pid)
            container = self.resolver.container_of(pid)
        except ProcessGone:
            return life.container if life is not None else None
        if born > end + SLACK:
            # The living process came after the record: its pid was reused.
            self._add(pid, Life(container, born=born, checked=now))
            return life.container if life is not None else None
        if life is not None and (life.born == -math.inf or abs(life.born - born) <= SLACK):
            life.container = container
            life.born = born
            life.checked = now
        else:
            self._add(pid, Life(container, born=born, checked=now))
        return container

    # --- Housekeeping -----------------------------------------------------

    def prune(self, before: float) -> int:
        """Forget lives that ended before wall time ``before``; return how many were dropped."""
        dropped = 0
        for pid in list(self.lives):
            lives = self.lives[pid]
            kept = [life for life in lives if life.died >= before]
            dropped += len(lives) - len(kept)
            if kept:
                self.lives[pid] = kept
            else:
                del self.lives[pid]
        return dropped

    def describe(self, pid: int) -> str:
        """Return the known lives of ``pid`` as text, for debug logs."""
        parts = []
        for life in self.lives.get(pid, ()):
            container = "unknown" if life.container is UNKNOWN else (life.container[:12] or "host")
            parts.append(f"{container} born {life.born:.3f} died {life.died:.3f} parent {life.parent}")
        return "; ".join(parts) or "no lives"

    def __len__(self) -> int:
        return len(self.lives)

    def _newest(self, pid: int) -> Life | None:
        lives = self.lives.get(pid)
        return lives[-1] if lives else None

    def _life_during(self, pid: int, start: float, end: float) -> Life | None:
        """Return the newest life of ``pid`` that overlaps wall times ``[start, end]``, or None."""
        for life in reversed(self.lives.get(pid, ())):
            if life.born <= end + SLACK:
                return life if start <= life.died + SLACK else None
        return None

    def _add(self, pid: int, life: Life) -> None:
        lives = self.lives.setdefault(pid, [])
        if lives and lives[-1].died == math.inf and lives[-1].born < life.born:
            lives[-1].died = life.born
        lives.append(life)
        if len(lives) > MAX_LIVES:
            del lives[0]

    def _read_container(self, pid: int) -> str | None:
        self.proc_reads += 1
        try:
            return self.resolver.container_of(pid)
        except ProcessGone:
            return UNKNOWN

    def _born(self, pid: int, fallback: float) -> float:
        try:
            return self.boot_wall_time + start_time(pid)
        except ProcessGone:
            return fallback
