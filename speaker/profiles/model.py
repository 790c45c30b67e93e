"""The profile model: syscall names per architecture and phase, with where they came from.

A ``Profile`` is what users keep, review, merge and ship. Every format module
reads into it or writes from it. Names are kept per architecture (``x86_64``,
``x86``, ``x32``) because a 32-bit syscall is a different kernel entry point
from the 64-bit one of the same name. ``traces`` records the provenance of
each traced container that contributed, and a profile is complete only when
every one of them is.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping

from speaker.compile.arches import check_syscall, host_arches
from speaker.events import PHASES, Phase


@dataclasses.dataclass
class Transition:
    """A phase change of a traced container."""

    phase: Phase
    previous: Phase | None
    #: Wall-clock time of the change, in seconds since the epoch.
    time: float
    reason: str = ""
    #: Stable name of what decided, such as ``window``, ``listen`` or ``kill``.
    detector: str = ""


@dataclasses.dataclass
class TraceInfo:
    """Provenance of one traced container: what ran, where, and how complete the record is."""

    container_id: str = ""
    container_name: str = ""
    image: str = ""
    #: What produced the record, such as ``pipeline pipelines/trace.toml`` or ``rephase trace.jsonl``.
    source: str = ""
    #: Wall-clock times of the first and the last observation, in seconds since the epoch.
    started: float | None = None
    ended: float | None = None
    kernel: str = ""
    docker_version: str = ""
    speaker_version: str = ""
    libseccomp_version: str = ""
    #: Detector that decided the change to running.
    detector: str = ""
    transitions: list[Transition] = dataclasses.field(default_factory=list)
    #: Syscall observations that the trace detected as missed, by loss reason.
    lost: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Syscall numbers libseccomp could not name, as ``{arch: {nr: calls}}``.
    unresolved: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None
    complete: bool = True
    #: Sentences saying why the record is incomplete.
    problems: list[str] = dataclasses.field(default_factory=list)

    def mark_incomplete(self, problem: str) -> None:
        """Record ``problem`` and mark the trace incomplete. A repeated problem is recorded once."""
        self.complete = False
        if problem not in self.problems:
            self.problems.append(problem)


def utc_now() -> str:
    """Return the current time as ISO 8601 in UTC with second precision, as profile.json stores it."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def empty_phases() -> dict[Phase, set[str]]:
    return {phase: set() for phase in PHASES}


@dataclasses.dataclass
class Profile:
    """Syscall names per architecture and phase, with call counts and provenance."""

    #: ``{arch: {phase: names}}``. Every arch present has all three phases.
    syscalls: dict[str, dict[Phase, set[str]]] = dataclasses.field(default_factory=dict)
    #: ``{arch: {phase: {name: calls}}}``, empty for formats that carry no counts.
    counts: dict[str, dict[Phase, dict[str, int]]] = dataclasses.field(default_factory=dict)
    traces: list[TraceInfo] = dataclasses.field(default_factory=list)
    #: Sentences about how the profile was made or changed, such as a merge or an edit.
    notes: list[str] = dataclasses.field(default_factory=list)
    created: str = dataclasses.field(default_factory=utc_now)

    # --- Building ---------------------------------------------------------

    def add(self, arch: str, phase: Phase, name: str, calls: int = 0) -> None:
        """Add syscall ``name`` of ``arch`` to ``phase``, adding ``calls`` to its count."""
        self.syscalls.setdefault(arch, empty_phases())[phase].add(name)
        if calls:
            by_name = self.counts.setdefault(arch, {}).setdefault(phase, {})
            by_name[name] = by_name.get(name, 0) + calls

    def add_names(self, arch: str, phase: Phase, names: Iterable[str]) -> None:
        for name in names:
            self.add(arch, phase, name)

    @classmethod
    def from_lists(cls, lists: Mapping[Phase, Iterable[str]], arch: str | None = None) -> Profile:
        """Build a profile from per-phase names, all on ``arch`` (default: the host's native arch)."""
        profile = cls()
        target = arch or host_arches()[0]
        profile.syscalls[target] = empty_phases()
        for phase in PHASES:
            profile.add_names(target, phase, lists.get(phase, ()))
        return profile

    # --- Reading ----------------------------------------------------------

    @property
    def arches(self) -> tuple[str, ...]:
        """Return the architectures that have at least one syscall, host order first."""
        order = {arch: index for index, arch in enumerate(host_arches())}
        present = [arch for arch, phases in self.syscalls.items() if any(phases.values())]
        return tuple(sorted(present, key=lambda arch: (order.get(arch, len(order)), arch)))

    def phase(self, phase: Phase, arch: str | None = None) -> frozenset[str]:
        """Return the names of ``phase`` on ``arch``, or the union over arches when None."""
        if arch is not None:
            return frozenset(self.syscalls.get(arch, {}).get(phase, ()))
        return frozenset().union(*(phases.get(phase, ()) for phases in self.syscalls.values()))

    def union(self, arch: str | None = None) -> frozenset[str]:
        """Return the names of all phases together, on ``arch`` or on every arch."""
        return frozenset().union(*(self.phase(phase, arch) for phase in PHASES))

    def calls(self, arch: str, phase: Phase, name: str) -> int | None:
        """Return how often ``name`` was called in ``phase``, or None when the profile has no counts for it."""
        return self.counts.get(arch, {}).get(phase, {}).get(name)

    def phase_calls(self, phase: Phase) -> int:
        """Return the total calls counted in ``phase`` over all arches."""
        return sum(sum(self.counts.get(arch, {}).get(phase, {}).values()) for arch in self.counts)

    def lists(self) -> dict[str, dict[Phase, frozenset[str]]]:
        """Return ``syscalls`` with frozen sets, in the shape the compile functions take."""
        return {arch: {phase: frozenset(names) for phase, names in phases.items()} for arch, phases in self.syscalls.items()}

    @property
    def complete(self) -> bool:
        """Return False when any contributing trace is incomplete."""
        return all(trace.complete for trace in self.traces)

    @property
    def problems(self) -> list[str]:
        """Return every trace's problems, prefixed with its container when there are several traces."""
        result = []
        for trace in self.traces:
            label = trace.container_name or trace.container_id[:12]
            for problem in trace.problems:
                result.append(f"{label}: {problem}" if len(self.traces) > 1 and label else problem)
        return result

    @property
    def images(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(trace.image for trace in self.traces if trace.image))

    def empty_phases(self) -> tuple[Phase, ...]:
        return tuple(phase for phase in PHASES if not self.phase(phase))

    def validate(self) -> None:
        """Raise UnknownSyscall for the first name that libseccomp does not know on its arch."""
        for arch, phases in self.syscalls.items():
            for phase in PHASES:
                for name in sorted(phases.get(phase, ())):
                    check_syscall(arch, name)
