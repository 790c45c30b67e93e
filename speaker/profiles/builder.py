"""Build one profile per container from phase-tagged pipeline events.

The ``profile_files`` sink and the ``rephase`` command feed events to a
``ProfileBuilder`` and ask it for each container's profile. The builder
never drops what it has seen. Anything that makes a profile doubtful (lost
records, syscalls without a phase, numbers libseccomp cannot name, a phase
that was never observed) marks the profile incomplete, with a sentence that
explains why.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable

import speaker
from speaker.compile.arches import ARCH_TOKENS, libseccomp_version, syscall_table
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    Event,
    Phase,
    PhaseChange,
    RecordLoss,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)
from speaker.profiles.model import Profile, TraceInfo, Transition

# Placeholder prefix that the classify stage gives numbers libseccomp cannot name.
_UNKNOWN_PREFIX = "unknown:"


@dataclasses.dataclass
class ContainerProfile:
    """The profile being built for one container, with the state of its life so far."""

    profile: Profile
    trace: TraceInfo
    #: Calls that arrived without a phase.
    unphased_calls: int = 0
    exited: bool = False
    #: True when an event changed the profile since the sink last wrote it.
    dirty: bool = True


class ProfileBuilder:
    """Collect syscall, phase, lifecycle and loss events into one profile per container."""

    def __init__(self, source: str = "", docker_version: str = "") -> None:
        self.source = source
        self.docker_version = docker_version
        self.containers: dict[str, ContainerProfile] = {}
        #: Losses attributed to no container, which make every profile incomplete.
        self.unattributed_lost: dict[str, int] = {}
        #: Syscall calls that arrived without a container id.
        self.unattributed_calls = 0

    def add_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.add(event)

    def add(self, event: Event) -> ContainerProfile | None:
        """Record one event and return the entry of the container it changed, or None."""
        if isinstance(event, SyscallCounts):
            return self._add_counts(event)
        if isinstance(event, SyscallRecord):
            return self._add_calls(event, event.phase, ((event.arch, event.nr, event.name, 1),), event.record_time)
        if isinstance(event, RecordLoss):
            return self._add_loss(event)
        if not event.container_id:
            return None
        entry = self.container(event.container_id)
        if isinstance(event, PhaseChange):
            time = event.start_time or event.wall_time
            entry.trace.transitions.append(Transition(event.phase, event.previous, time, event.reason, event.detector))
            if event.phase is Phase.RUNNING:
                entry.trace.detector = event.detector
        elif isinstance(event, ContainerEvent):
            self._add_lifecycle(entry, event)
        elif isinstance(event, TraceIncomplete):
            entry.trace.mark_incomplete(event.detail or event.reason)
        else:
            return None
        entry.dirty = True
        return entry

    def container(self, container_id: str) -> ContainerProfile:
        """Return the entry of ``container_id``, creating it on first sight."""
        entry = self.containers.get(container_id)
        if entry is None:
            trace = TraceInfo(
                container_id=container_id,
                source=self.source,
                kernel=os.uname().release,
                docker_version=self.docker_version,
                speaker_version=speaker.__version__,
                libseccomp_version=libseccomp_version(),
            )
            entry = self.containers[container_id] = ContainerProfile(Profile(), trace)
        return entry

    def _add_counts(self, event: SyscallCounts) -> ContainerProfile | None:
        calls = ((key.arch, key.nr, key.name, count) for key, count in event.counts.items())
        entry = self._add_calls(event, event.phase, calls, event.start_time)
        if entry is not None:
            self._observed(entry.trace, event.end_time)
        return entry

    def _add_calls(
        self,
        event: Event,
        phase: Phase | None,
        calls: Iterable[tuple[str, int, str, int]],
        time: float,
    ) -> ContainerProfile | None:
        if not event.container_id:
            self.unattributed_calls += sum(count for *_, count in calls)
            return None
        entry = self.container(event.container_id)
        self._observed(entry.trace, time)
        for arch, nr, name, count in calls:
            if phase is None:
                entry.unphased_calls += count
                continue
            resolved = self._name(arch, nr, name)
            if resolved is None:
                numbers = entry.trace.unresolved.setdefault(arch, {})
                numbers[nr] = numbers.get(nr, 0) + count
                continue
            entry.profile.add(arch, phase, resolved, count)
        entry.dirty = True
        return entry

    @staticmethod
    def _name(arch: str, nr: int, name: str) -> str | None:
        if arch not in ARCH_TOKENS:
            return None
        table = syscall_table(arch)
        if name and not name.startswith(_UNKNOWN_PREFIX):
            return name if table.number(name) is not None else None
        return table.name(nr)

    def _add_loss(self, event: RecordLoss) -> ContainerProfile | None:
        if not event.container_id:
            self.unattributed_lost[event.reason] = self.unattributed_lost.get(event.reason, 0) + event.count
            for entry in self.containers.values():
                entry.dirty = True
            return None
        entry = self.container(event.container_id)
        entry.trace.lost[event.reason] = entry.trace.lost.get(event.reason, 0) + event.count
        entry.dirty = True
        return entry

    def _add_lifecycle(self, entry: ContainerProfile, event: ContainerEvent) -> None:
        trace = entry.trace
        if event.name:
            trace.container_name = event.name.lstrip("/")
        if event.image:
            trace.image = event.image
        when = event.event_time or event.wall_time
        if event.action in (ContainerAction.CREATE, ContainerAction.START) and trace.started is None:
            trace.started = when
        elif event.action is ContainerAction.DIE:
            trace.exit_code = event.exit_code
            entry.exited = True
        elif event.action is ContainerAction.DESTROY:
            entry.exited = True
        elif event.action is ContainerAction.EVENTS_GAP:
            start = f" from {event.gap_start:.3f}" if event.gap_start else ""
            trace.mark_incomplete(f"Docker events were missed{start} to {when:.3f}, so phase changes may be missing")
        self._observed(trace, when)

    @staticmethod
    def _observed(trace: TraceInfo, time: float) -> None:
        if not time:
            return
        if trace.started is None or time < trace.started:
            trace.started = time
        if trace.ended is None or time > trace.ended:
            trace.ended = time

    def profile(self, container_id: str) -> Profile:
        """Return a finished copy of the container's profile, with completeness decided now.

        The builder's own state is not changed, so more events can follow and
        a later call gives the updated profile.
        """
        entry = self.containers[container_id]
        profile = copy.deepcopy(entry.profile)
        trace = copy.deepcopy(entry.trace)
        for reason, count in self.unattributed_lost.items():
            trace.lost[reason] = trace.lost.get(reason, 0) + count
        for problem in self._problems(entry, trace):
            trace.mark_incomplete(problem)
        profile.traces = [trace]
        label = trace.container_name or container_id[:12]
        profile.notes = [f"traced from container {label}" + (f" ({self.source})" if self.source else "")]
        return profile

    def _problems(self, entry: ContainerProfile, trace: TraceInfo) -> list[str]:
        problems = []
        if trace.lost:
            total = sum(trace.lost.values())
            detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(trace.lost.items()))
            records = "1 syscall record was" if total == 1 else f"{total} syscall records were"
            problems.append(f"{records} lost ({detail}), so any phase may miss syscalls")
        if entry.unphased_calls:
            problems.append(f"{entry.unphased_calls} syscall(s) arrived without a phase and are in no list")
        unresolved = sum(sum(numbers.values()) for numbers in trace.unresolved.values())
        if unresolved:
            numbers = ", ".join(f"{arch} {nr}" for arch, by_nr in trace.unresolved.items() for nr in sorted(by_nr))
            problems.append(f"{unresolved} calls of syscall numbers libseccomp cannot name ({numbers}) are in no list")
        phases = {transition.phase for transition in trace.transitions}
        if Phase.RUNNING not in phases:
            problems.append("the container never reached the running phase, so the running list is empty or partial")
        if Phase.SHUTDOWN not in phases:
            problems.append("the trace ended before the container was asked to stop, so the shutdown list is empty")
        elif not entry.exited:
            problems.append("the trace ended before the container exited, so the shutdown list may be short")
        # A phase that began always makes syscalls, so an empty list means
        # they were missed. The checks above already explain an empty
        # running or shutdown list of a phase that never began.
        explained = {phase for phase in (Phase.RUNNING, Phase.SHUTDOWN) if phase not in phases}
        for phase in entry.profile.empty_phases():
            if phase not in explained:
                problems.append(f"the {phase} list is empty although the phase began, so its syscalls were missed")
        return problems

    def container_ids(self) -> list[str]:
        return list(self.containers)
