"""Per-container timelines of a trace: syscalls per second, distinct syscalls per second, phase boundaries.

The input is a trace log written by the ``trace_log`` sink (per-second rows
plus lifecycle and phase events), or a JSON lines file of pipeline events
written by the ``jsonl`` sink. Both become the same ``ContainerTimeline``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from speaker.events import (
    PHASES,
    ContainerAction,
    ContainerEvent,
    Event,
    Phase,
    PhaseChange,
    RecordLoss,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
    event_from_dict,
)
from speaker.trace_file import HEADER_TYPE, ROW_TYPE, TraceFileError, check_event_times, clip_message, decode_line, read_trace


class ReportInputError(ValueError):
    """A trace the report cannot read. The message names the file and line."""


# TODO: the per-second series is built densely, so a watch-mode trace longer
# than MAX_SPAN cannot be reported (one stray row years away would need gigabytes).
#: Longest time span a report covers, 31 days in seconds.
MAX_SPAN = 31 * 86400


@dataclasses.dataclass
class Boundary:
    """The start of a phase, with the detector that decided it."""

    phase: Phase
    #: Wall-clock seconds since the epoch.
    time: float
    detector: str
    reason: str


@dataclasses.dataclass
class PhaseStats:
    """Totals of one phase of one container."""

    phase: Phase
    #: Seconds from the container's start; ``end`` is the next boundary or the last observation.
    start: float
    end: float
    calls: int
    distinct: int
    peak_distinct_per_second: int

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.duration if self.duration > 0 else float(self.calls)


@dataclasses.dataclass
class ContainerTimeline:
    """Syscall counts, phase boundaries and lifecycle moments of one traced container."""

    container_id: str
    name: str = ""
    image: str = ""
    #: Calls and names per whole second of wall-clock time (seconds since the epoch).
    calls: dict[int, int] = dataclasses.field(default_factory=dict)
    names: dict[int, set[str]] = dataclasses.field(default_factory=dict)
    #: Names per whole second and phase, for each phase's peak of distinct syscalls per second.
    second_phase_names: dict[tuple[int, Phase], set[str]] = dataclasses.field(default_factory=dict)
    #: Names per phase, for the distinct count of each phase.
    phase_names: dict[Phase, set[str]] = dataclasses.field(default_factory=dict)
    phase_calls: dict[Phase, int] = dataclasses.field(default_factory=dict)
    boundaries: list[Boundary] = dataclasses.field(default_factory=list)
    #: Lifecycle moments worth marking, as (wall-clock time, label).
    markers: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    lost: int = 0
    started: float | None = None

    @property
    def label(self) -> str:
        return self.name or self.container_id[:12]

    @property
    def origin(self) -> float:
        """Return the time all offsets count from: the container's start, else its first phase or observation."""
        if self.started:
            return self.started
        if self.boundaries:
            return min(boundary.time for boundary in self.boundaries)
        return float(min(self.calls)) if self.calls else 0.0

    @property
    def last_time(self) -> float:
        times = [float(max(self.calls) + 1)] if self.calls else []
        times += [time for time, _ in self.markers] + [b.time for b in self.boundaries]
        return max(times) if times else self.origin

    def series(self) -> tuple[list[float], list[int], list[int]]:
        """Return (start of each second, syscalls in it, distinct syscalls in it), with gaps as zero.

        Starts are offsets from ``origin``. The second that contains the
        origin starts at 0, because none of its calls happened earlier.
        """
        if not self.calls:
            return [], [], []
        first, last = min(self.calls), max(self.calls)
        origin = self.origin
        seconds = list(range(first, last + 1))
        return (
            [max(second - origin, 0.0) if second <= origin < second + 1 else second - origin for second in seconds],
            [self.calls.get(second, 0) for second in seconds],
            [len(self.names.get(second, ())) for second in seconds],
        )

    def check_span(self) -> None:
        """Raise ReportInputError when the syscalls span more than ``MAX_SPAN`` seconds."""
        if not self.calls:
            return
        first, last = min(self.calls), max(self.calls)
        if last - first > MAX_SPAN:
            raise ReportInputError(
                f"the syscalls of container {self.label} span {last - first} seconds, from {first} to {last}, "
                f"more than the {MAX_SPAN} seconds (31 days) a report covers: check the trace for rows with wrong times"
            )

    def phase_stats(self) -> list[PhaseStats]:
        """Return one entry per phase that began, in order."""
        origin = self.origin
        ordered = sorted(self.boundaries, key=lambda item: item.time)
        stats = []
        for index, boundary in enumerate(ordered):
            end = ordered[index + 1].time if index + 1 < len(ordered) else self.last_time
            peak = max(
                (len(names) for (_, phase), names in self.second_phase_names.items() if phase is boundary.phase),
                default=0,
            )
            stats.append(
                PhaseStats(
                    phase=boundary.phase,
                    start=boundary.time - origin,
                    end=end - origin,
                    calls=self.phase_calls.get(boundary.phase, 0),
                    distinct=len(self.phase_names.get(boundary.phase, ())),
                    peak_distinct_per_second=peak,
                )
            )
        return stats


def read_events(path: Path) -> Iterator[Event]:
    """Yield the events of a trace log or a jsonl event file. Raises ReportInputError naming file and line."""
    try:
        with path.open("rb") as stream:
            first = stream.readline()
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot read the trace: {exc.strerror}") from None
    try:
        header = decode_line(path, 1, first)
    except TraceFileError as exc:
        raise ReportInputError(f"{exc}; pass a trace_log file or a jsonl event file") from None
    if isinstance(header, dict) and header.get("type") == HEADER_TYPE:
        try:
            yield from read_trace(path)
        except TraceFileError as exc:
            raise ReportInputError(str(exc)) from None
        return
    yield from _read_event_file(path)


def _read_event_file(path: Path) -> Iterator[Event]:
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                data = decode_line(path, number, raw)
            except TraceFileError as exc:
                raise ReportInputError(f"{exc}; pass a trace_log file or a jsonl event file") from None
            if data is None:
                continue
            if isinstance(data, dict) and data.get("type") == ROW_TYPE:
                # A trace log whose header line is missing or damaged.
                raise ReportInputError(
                    f"{path}:1: not a trace log: the first line must be the trace_log header that the trace_log "
                    f"sink writes, but line {number} is a syscall row of a trace log"
                )
            try:
                event = event_from_dict(data)
                check_event_times(event)
            except ValueError as exc:
                raise ReportInputError(
                    f"{path}:{number}: not a trace line ({clip_message(str(exc))}); pass a trace_log file or a jsonl event file"
                ) from None
            yield event


def build_timelines(events: Iterable[Event]) -> dict[str, ContainerTimeline]:
    """Return the timeline of every container the events name, in order of first appearance."""
    timelines: dict[str, ContainerTimeline] = {}
    unattributed_loss = 0
    for event in events:
        if isinstance(event, RecordLoss) and not event.container_id:
            unattributed_loss += event.count
            continue
        if not event.container_id:
            continue
        timeline = timelines.get(event.container_id)
        if timeline is None:
            timeline = timelines[event.container_id] = ContainerTimeline(event.container_id)
        _add(timeline, event)
    for timeline in timelines.values():
        timeline.lost += unattributed_loss
        if timeline.lost:
            timeline.problems.append(f"{timeline.lost} syscall records were lost")
    return timelines


def _add(timeline: ContainerTimeline, event: Event) -> None:
    if isinstance(event, SyscallCounts):
        second = math.floor(event.start_time)
        calls = sum(event.counts.values())
        _count(timeline, second, event.phase, calls, {key.name or f"{key.arch}:{key.nr}" for key in event.counts})
    elif isinstance(event, SyscallRecord):
        _count(timeline, math.floor(event.record_time), event.phase, 1, {event.name or f"{event.arch}:{event.nr}"})
    elif isinstance(event, PhaseChange):
        timeline.boundaries.append(Boundary(event.phase, event.start_time or event.wall_time, event.detector, event.reason))
    elif isinstance(event, ContainerEvent):
        timeline.name = event.name.lstrip("/") or timeline.name
        timeline.image = event.image or timeline.image
        when = event.event_time or event.wall_time
        if event.action is ContainerAction.START and timeline.started is None:
            timeline.started = when
        elif event.action in (ContainerAction.KILL, ContainerAction.STOP, ContainerAction.DIE):
            timeline.markers.append((when, event.action.value))
    elif isinstance(event, TraceIncomplete):
        timeline.problems.append(event.detail or event.reason)
    elif isinstance(event, RecordLoss):
        timeline.lost += event.count


def _count(timeline: ContainerTimeline, second: int, phase: Phase | None, calls: int, names: set[str]) -> None:
    timeline.calls[second] = timeline.calls.get(second, 0) + calls
    timeline.names.setdefault(second, set()).update(names)
    if phase is not None:
        timeline.phase_calls[phase] = timeline.phase_calls.get(phase, 0) + calls
        timeline.phase_names.setdefault(phase, set()).update(names)
        timeline.second_phase_names.setdefault((second, phase), set()).update(names)


__all__ = ["PHASES", "Boundary", "ContainerTimeline", "PhaseStats", "ReportInputError", "build_timelines", "read_events"]
