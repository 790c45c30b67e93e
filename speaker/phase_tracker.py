"""Assign syscall events to phases, per container, from lifecycle events and a readiness detector.

This is the logic of the ``phase_machine`` stage without the pipeline around
it, so that the ``rephase`` command can run it over a recorded trace.

Each container goes through booting, running and shutdown:

* **booting** from its start. The runtime's syscalls after the seccomp filter
  is installed (runc init, before it execs the entrypoint) come before
  Docker's ``start`` event, and they belong to booting too.
* **running** from the time the detector reports (``Readiness.time``).
* **shutdown** from Docker's ``kill`` event with the container's stop signal
  or SIGKILL, or from its ``stop`` event if no such kill came first.

A syscall event covers the kernel record times ``[start, end]``. It belongs to
the phase that contains the whole interval. An interval that straddles a
boundary goes to running, because enforcement allows the running list in
every phase, so that choice never denies a syscall that really happened.

Events are held until their phase is known. Before the detector fires that
means holding every syscall of the container. After it fires, a running
event waits until ``lag`` has passed beyond its start, because Docker's kill
event can arrive after records that follow it.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

from speaker.detectors import Detector, DetectorSpec, Readiness
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    Event,
    Phase,
    PhaseChange,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)

SyscallEvent = SyscallCounts | SyscallRecord


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
    """Phase boundary settings, shared by every container of a pipeline."""

    detector: DetectorSpec
    #: Seconds after the start by which the detector must fire.
    ready_timeout: float
    #: Maximum seconds by which an event may arrive after its own time.
    #: Events later than that may land in the wrong phase.
    lag: float


def event_time(event: Event) -> float:
    """Return the time an event is about: kernel record time for syscalls, Docker's time for lifecycle events."""
    if isinstance(event, SyscallCounts):
        return event.end_time
    if isinstance(event, SyscallRecord):
        return event.record_time
    if isinstance(event, ContainerEvent):
        return event.event_time or event.wall_time
    return event.wall_time


def interval(event: SyscallEvent) -> tuple[float, float]:
    """Return the kernel record times ``(start, end)`` that a syscall event covers."""
    if isinstance(event, SyscallCounts):
        return event.start_time, event.end_time
    return event.record_time, event.record_time


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ContainerPhases:
    """Phase state and held syscall events of one container."""

    def __init__(self, container_id: str, settings: PhaseSettings, log: Any) -> None:
        self.container_id = container_id
        self.settings = settings
        self.log = log
        self.name = ""
        #: Wall-clock time of Docker's start event, None until it arrives.
        self.started_at: float | None = None
        self.detector: Detector | None = None
        self.readiness: Readiness | None = None
        self.run_time: float | None = None
        self.stop_time: float | None = None
        self.exit_time: float | None = None
        self.exit_code: int | None = None
        #: Reason token of the TraceIncomplete sent for this container, if any.
        self.incomplete: str | None = None
        #: The last phase announced with a PhaseChange, None before booting.
        self.phase: Phase | None = None
        self.held: list[SyscallEvent] = []
        #: Running events released before a late kill event, which may belong to shutdown.
        self.released_before_stop = 0
        self._last_running_start = float("-inf")

    # --- Input --------------------------------------------------------------

    def hold(self, event: SyscallEvent, out: list[Event]) -> None:
        self.held.append(event)
        if self.detector is not None and self.readiness is None and isinstance(event, self.detector.accepts):
            self._ready(self.detector.observe(event), out)

    def observe(self, event: Event, out: list[Event]) -> None:
        """Pass a non-syscall event of this container to the detector."""
        if self.detector is not None and self.readiness is None and isinstance(event, self.detector.accepts):
            self._ready(self.detector.observe(event), out)

    def lifecycle(self, event: ContainerEvent, out: list[Event]) -> None:
        when = event.event_time or event.wall_time
        if event.name:
            self.name = event.name
        action = event.action
        if action == ContainerAction.START:
            self._start(when, out)
            self.observe(event, out)
        elif action == ContainerAction.KILL:
            stop_signal = event.stop_signal or signal.SIGTERM
            if event.signal in (stop_signal, signal.SIGKILL):
                reason = f"Docker sent {signal_name(event.signal)}"
                if event.signal == stop_signal:
                    reason += ", the container's stop signal"
                self._stop(when, reason, "kill", out)
            else:
                self.log.info(
                    "kill_ignored",
                    container=self.container_id,
                    signal=signal_name(event.signal or 0),
                    reason="not the stop signal, so the container keeps running",
                )
        elif action == ContainerAction.STOP:
            self._stop(when, "Docker stopped the container", "stop", out)
        elif action == ContainerAction.DIE:
            self.exit_time = when
            self.exit_code = event.exit_code
        else:
            self.observe(event, out)

    def _start(self, when: float, out: list[Event]) -> None:
        if self.started_at is not None:
            # TODO: a restarted container keeps the phases of its first life, so
            # the second boot lands in whatever phase the first one ended in.
            self.log.warning("container_restarted", container=self.container_id, reason="restarts are not traced apart")
            return
        self.started_at = when
        self.detector = self.settings.detector.create(when)
        self._announce(Phase.BOOTING, "the container started", "start", when, out)

    def _stop(self, when: float, reason: str, detector: str, out: list[Event]) -> None:
        if self.stop_time is not None:
            return
        # NOTE: Docker logs the kill event after the signal has reached the
        # container (6 to 14 ms later in nginx traces on a 2-core host), so a server that
        # exits faster than that leaves its whole shutdown in running.
        self.stop_time = when
        if self.released_before_stop and self._last_running_start >= when:
            self.log.warning(
                "late_stop_event",
                container=self.container_id,
                detail="some syscalls after the stop were already written to running, because the stop "
                "event arrived later than lag; running only gains syscalls from this",
            )
        self._announce(Phase.SHUTDOWN, reason, detector, when, out)

    # --- Decisions ----------------------------------------------------------

    def _ready(self, readiness: Readiness | None, out: list[Event]) -> None:
        if readiness is None or self.readiness is not None or self.incomplete is not None:
            return
        if self.stop_time is not None and readiness.time >= self.stop_time:
            self.log.info("readiness_after_stop", container=self.container_id, detector=readiness.detector)
            return
        self.readiness = readiness
        self.run_time = readiness.time
        self._announce(Phase.RUNNING, readiness.reason, readiness.detector, readiness.time, out)

    def _announce(self, phase: Phase, reason: str, detector: str, when: float, out: list[Event]) -> None:
        if self.phase is None and phase != Phase.BOOTING:
            self._announce(Phase.BOOTING, "the container started", "start", self.started_at or when, out)
        out.append(
            PhaseChange(
                container_id=self.container_id,
                phase=phase,
                previous=self.phase,
                reason=reason,
                detector=detector,
                start_time=when,
            )
        )
        self.phase = phase

    def _incomplete(self, reason: str, detail: str, out: list[Event]) -> None:
        self.incomplete = reason
        out.append(TraceIncomplete(container_id=self.container_id, reason=reason, detail=detail))

    def _check_booting_end(self, complete_before: float, final: bool, out: list[Event]) -> None:
        """Send TraceIncomplete once the container can no longer be found ready."""
        if self.readiness is not None or self.incomplete is not None:
            return
        described = self.settings.detector.describe()
        end = self.stop_time if self.stop_time is not None else self.exit_time
        if end is None:
            if final:
                self._incomplete(
                    "ended_while_booting", f"the trace ended before {described} found the container ready", out
                )
            return
        if not final and complete_before <= end:
            return
        if self.stop_time is not None:
            self._incomplete(
                "stopped_while_booting", f"the container was stopped before {described} found it ready", out
            )
        else:
            code = "" if self.exit_code is None else f" with code {self.exit_code}"
            self._incomplete(
                "exited_while_booting", f"the container exited{code} before {described} found it ready", out
            )

    def advance(self, now: float, out: list[Event]) -> None:
        """Let time pass up to ``now``: run time-driven detectors, check the timeout, release held events."""
        complete_before = now - self.settings.lag
        if self.detector is not None and self.readiness is None and self.incomplete is None:
            self._ready(self.detector.advance(complete_before), out)
        if (
            self.started_at is not None
            and self.readiness is None
            and self.incomplete is None
            and complete_before >= self.started_at + self.settings.ready_timeout
        ):
            self._incomplete(
                "detector_timeout",
                f"{self.settings.detector.describe()} did not find the container ready within "
                f"{self.settings.ready_timeout:g}s of its start, so every syscall stays in booting",
                out,
            )
        self._check_booting_end(complete_before, False, out)
        self._release(complete_before, final=False, out=out)

    def finish(self, out: list[Event]) -> None:
        """Release everything at the end of input."""
        if self.phase is None:
            self._announce(Phase.BOOTING, "the container started", "start", self.started_at or 0.0, out)
        self._check_booting_end(float("inf"), True, out)
        self._release(float("inf"), final=True, out=out)

    def _release(self, complete_before: float, final: bool, out: list[Event]) -> None:
        if not self.held:
            return
        # Without readiness, booting ends only when the detector has given up.
        booting_final = final or self.readiness is not None or self.incomplete is not None
        if not booting_final and self.stop_time is None:
            return
        kept: list[SyscallEvent] = []
        for event in self.held:
            phase = self._phase_of(event, complete_before, booting_final, final)
            if phase is None:
                kept.append(event)
                continue
            if phase == Phase.RUNNING and self.stop_time is None:
                self.released_before_stop += 1
                self._last_running_start = max(self._last_running_start, interval(event)[0])
            out.append(dataclasses.replace(event, phase=phase))
        self.held = kept

    def _phase_of(
        self, event: SyscallEvent, complete_before: float, booting_final: bool, final: bool
    ) -> Phase | None:
        start, end = interval(event)
        stop = self.stop_time
        if stop is not None and start >= stop:
            return Phase.SHUTDOWN
        run = self.run_time
        if run is None:
            if not booting_final:
                return None
            if stop is not None and end >= stop:
                return Phase.RUNNING  # straddles the booting-shutdown boundary
            return Phase.BOOTING
        if end < run:
            return Phase.BOOTING
        if start < run or stop is not None:
            return Phase.RUNNING
        # The stop is unknown, so a kill event with a time before ``start``
        # may still arrive, until ``lag`` has passed.
        if final or start < complete_before or self.exit_time is not None and complete_before > self.exit_time:
            return Phase.RUNNING
        return None


class PhaseMachine:
    """Phase state of every container of a pipeline, fed one event at a time.

    ``feed``, ``advance`` and ``finish`` return the events to send downstream:
    the fed event itself unless it is a held syscall event, then any
    PhaseChange, TraceIncomplete and released syscall events.
    """

    def __init__(self, settings: PhaseSettings, log: Any) -> None:
        self.settings = settings
        self.log = log
        self.containers: dict[str, ContainerPhases] = {}
        #: Latest time of any event fed so far.
        self.latest = 0.0
        self._detector_types = settings.detector.accepts()

    def container(self, container_id: str) -> ContainerPhases:
        state = self.containers.get(container_id)
        if state is None:
            state = self.containers[container_id] = ContainerPhases(container_id, self.settings, self.log)
        return state

    def feed(self, event: Event) -> list[Event]:
        out: list[Event] = []
        when = event_time(event)
        if when > self.latest:
            self.latest = when
        container_id = event.container_id
        if isinstance(event, (SyscallCounts, SyscallRecord)) and container_id:
            self.container(container_id).hold(event, out)
            return out
        out.append(event)
        if isinstance(event, ContainerEvent) and container_id:
            self.container(container_id).lifecycle(event, out)
        elif isinstance(event, self._detector_types) and container_id in self.containers:
            # Samples and output lines do not make a container traced; its
            # lifecycle events and syscalls do.
            self.containers[container_id].observe(event, out)
        return out

    def advance(self, now: float) -> list[Event]:
        """Advance every container to ``now``, a wall-clock time up to which events have been fed."""
        out: list[Event] = []
        for state in self.containers.values():
            state.advance(now, out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        for state in self.containers.values():
            state.finish(out)
        return out
