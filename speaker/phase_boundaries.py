"""Place syscall events into phases once a container's phase boundaries are known.

A container has two boundaries: the start of running (the readiness time)
and the start of shutdown (the stop). A time ``t`` belongs to:

* booting when it is before the readiness time (or no readiness was found);
* running from the readiness time to the stop;
* shutdown from the stop on.

Kernel record times come from the kernel's coarse clock, which advances once
per jiffy, so two records with equal times can be in either order. When the
stop is the kernel time of a stop signal, a record with that same time may
have come just before the signal, so it belongs to the phase before the stop
and to shutdown. Record times of different values are in the order of the
calls.

Events are placed in three ways:

* a SyscallCounts with ``spans``: each key goes into every phase that its
  span reaches, from the phase of its first call to the phase of its last.
  Both ends are real calls, so the first and last phase are exact. Running
  can lie between booting and shutdown without a call of its own, and
  enforcement allows the running list in every phase, so that extra entry
  never denies a call. The key's count goes mostly to its first phase and 1
  to each other, so counts are approximate where a key crosses a boundary;
* a SyscallCounts without spans (the ebpf source outside the slot of a stop
  signal, a trace log row): the whole interval goes to its one phase, or to
  running when it straddles a boundary. In the slot of a stop signal the
  ebpf source sets spans over the whole slot, so its syscalls go to both
  running and shutdown;
* a SyscallRecord: the phase of its time, one copy per phase in the tick of a
  kernel stop.
"""

from __future__ import annotations

import dataclasses

from speaker.events import PHASES, Phase, SyscallCounts, SyscallKey, SyscallRecord

SyscallEvent = SyscallCounts | SyscallRecord


@dataclasses.dataclass
class Boundaries:
    """The phase boundaries of one container, as far as they are known."""

    #: Start of running (the readiness time), None until a detector fires.
    run: float | None = None
    #: Start of shutdown, None until a stop is known.
    stop: float | None = None
    #: True when ``stop`` is the kernel time of a stop signal, False when it is Docker's event time.
    stop_from_kernel: bool = False

    def phases_at(self, time: float) -> tuple[Phase, ...]:
        """Return the phases that a call with kernel record time ``time`` can belong to, in order."""
        before_stop = Phase.BOOTING if self.run is None or time < self.run else Phase.RUNNING
        stop = self.stop
        if stop is None or time < stop:
            return (before_stop,)
        if time == stop and self.stop_from_kernel:
            return (before_stop, Phase.SHUTDOWN)
        return (Phase.SHUTDOWN,)

    def phases_of_span(self, first: float, last: float) -> tuple[Phase, ...]:
        """Return the phases that the calls of a key between ``first`` and ``last`` reach, in order."""
        reached = set(self.phases_at(first)) | set(self.phases_at(last))
        if Phase.BOOTING in reached and Phase.SHUTDOWN in reached and self.run is not None:
            reached.add(Phase.RUNNING)
        return tuple(phase for phase in PHASES if phase in reached)

    def phase_of_interval(self, start: float, end: float) -> Phase:
        """Return the one phase of calls known only to lie between ``start`` and ``end``: running if they straddle a boundary."""
        reached = self.phases_of_span(start, end)
        return reached[0] if len(reached) == 1 else Phase.RUNNING


def times_of(event: SyscallEvent) -> list[float]:
    """Return the times whose phases decide where ``event`` goes."""
    if isinstance(event, SyscallRecord):
        return [event.record_time]
    if event.spans:
        times = [event.start_time, event.end_time]
        for first, last in event.spans.values():
            times.append(first)
            times.append(last)
        return times
    return [event.start_time, event.end_time]


def place(event: SyscallEvent, boundaries: Boundaries) -> list[SyscallEvent]:
    """Return ``event`` split into one event per phase, each with its ``phase`` set.

    Call it only when the phases of every time in ``times_of(event)`` are final.
    """
    if isinstance(event, SyscallRecord):
        return [dataclasses.replace(event, phase=phase) for phase in boundaries.phases_at(event.record_time)]
    if not event.spans:
        return [dataclasses.replace(event, phase=boundaries.phase_of_interval(event.start_time, event.end_time))]

    counts: dict[Phase, dict[SyscallKey, int]] = {}
    spans: dict[Phase, dict[SyscallKey, tuple[float, float]]] = {}
    for key, count in event.counts.items():
        span = event.spans.get(key)
        if span is None:
            # Not expected from the sources that send spans: place the key like a count without spans.
            reached: tuple[Phase, ...] = (boundaries.phase_of_interval(event.start_time, event.end_time),)
            span = (event.start_time, event.end_time)
        else:
            reached = boundaries.phases_of_span(*span)
        for index, phase in enumerate(reached):
            share = max(count - (len(reached) - 1), 1) if index == 0 else 1
            counts.setdefault(phase, {})[key] = share
            spans.setdefault(phase, {})[key] = span
    pieces: list[SyscallEvent] = []
    for phase in PHASES:
        if phase not in counts:
            continue
        phase_spans = spans[phase]
        pieces.append(
            dataclasses.replace(
                event,
                counts=counts[phase],
                spans=phase_spans,
                start_time=min(first for first, _ in phase_spans.values()),
                end_time=max(last for _, last in phase_spans.values()),
                phase=phase,
            )
        )
    return pieces
