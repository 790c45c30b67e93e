"""Combine and compare profiles: phase-wise union, differences, and reductions."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

from speaker.events import PHASES, Phase
from speaker.profiles.model import Profile, TraceInfo


def merge_profiles(profiles: Sequence[Profile], labels: Sequence[str]) -> Profile:
    """Return the phase-wise union of ``profiles``, with counts summed and every trace kept as provenance.

    ``labels`` (usually the paths read) name each input in the merged profile's notes.
    """
    if not profiles:
        raise ValueError("merging needs at least one profile")
    check_distinct(profiles, labels)
    traced = any(profile.traces for profile in profiles)
    merged = Profile()
    for label, profile in zip(labels, profiles):
        for arch, phases in profile.syscalls.items():
            for phase, names in phases.items():
                merged.add_names(arch, phase, names)
        for arch, phases in profile.counts.items():
            for phase, by_name in phases.items():
                target = merged.counts.setdefault(arch, {}).setdefault(phase, {})
                for name, calls in by_name.items():
                    target[name] = target.get(name, 0) + calls
        merged.traces.extend(copy.deepcopy(profile.traces))
        if traced and not profile.traces:
            # Without this entry the merged profile would count as complete
            # because of the other inputs' traces alone.
            unknown = TraceInfo(source=f"profile merge input {label}")
            unknown.mark_incomplete(
                f"{label} records no trace (it is a list directory or a seccomp JSON), "
                "so nothing shows that its lists are complete"
            )
            merged.traces.append(unknown)
    merged.notes.append(f"merged from {', '.join(labels)}: each phase is the union of theirs")
    for label, profile in zip(labels, profiles):
        merged.notes.extend(f"{label}: {note}" for note in profile.notes)
    return merged


def check_distinct(profiles: Sequence[Profile], labels: Sequence[str]) -> None:
    """Raise ValueError when two inputs contain the same trace, which a merge would count twice."""
    seen: dict[tuple[str, float | None], int] = {}
    for index, (label, profile) in enumerate(zip(labels, profiles)):
        for trace in profile.traces:
            if not trace.container_id:
                continue
            key = (trace.container_id, trace.started)
            first = seen.setdefault(key, index)
            if first != index:
                raise ValueError(
                    f"{labels[first]} and {label} both contain the trace of container {trace.container_id[:12]}: "
                    "merging the same trace twice would double its counts. Pass each trace once"
                )


@dataclasses.dataclass(frozen=True)
class PhaseDiff:
    """Names one phase gained and lost from profile A to profile B, over all arches."""

    phase: Phase
    added: frozenset[str]
    removed: frozenset[str]
    #: Names whose arches differ although both profiles list them, as {name: (arches in A, arches in B)}.
    moved: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


def diff_profiles(first: Profile, second: Profile) -> list[PhaseDiff]:
    """Return, per phase, what ``second`` adds to and removes from ``first``."""
    result = []
    for phase in PHASES:
        before, after = first.phase(phase), second.phase(phase)
        moved = {}
        for name in sorted(before & after):
            arches_before = tuple(arch for arch in first.arches if name in first.phase(phase, arch))
            arches_after = tuple(arch for arch in second.arches if name in second.phase(phase, arch))
            if arches_before != arches_after:
                moved[name] = (arches_before, arches_after)
        result.append(PhaseDiff(phase, after - before, before - after, moved))
    return result


@dataclasses.dataclass(frozen=True)
class PhaseSummary:
    """One row of ``profile show``."""

    phase: Phase
    names: frozenset[str]
    #: Names not in the previous phase (booting is compared with nothing).
    added: frozenset[str]
    #: Names of the previous phase that this phase no longer has.
    removed: frozenset[str]
    calls: int
    #: 1 - |phase| / |union of all phases|.
    reduction_vs_union: float
    #: 1 - |phase| / |baseline|, or None without a baseline.
    reduction_vs_baseline: float | None
    #: Names the phase allows that the baseline denies.
    beyond_baseline: frozenset[str]


def summarize(profile: Profile, baseline: frozenset[str] | None = None, arch: str | None = None) -> list[PhaseSummary]:
    """Return one summary row per phase, comparing names on ``arch`` (or all arches) with the union and a baseline."""
    union = profile.union(arch)
    rows = []
    previous: frozenset[str] = frozenset()
    for index, phase in enumerate(PHASES):
        names = profile.phase(phase, arch)
        rows.append(
            PhaseSummary(
                phase=phase,
                names=names,
                added=names - previous if index else names,
                removed=previous - names,
                calls=profile.phase_calls(phase),
                reduction_vs_union=1 - len(names) / len(union) if union else 0.0,
                reduction_vs_baseline=1 - len(names) / len(baseline) if baseline else None,
                beyond_baseline=names - baseline if baseline is not None else frozenset(),
            )
        )
        previous = names
    return rows
