"""Assign syscall events to phases, per container, from lifecycle events and a readiness detector.

This is the logic of the ``phase_machine`` stage without the pipeline around
it, so that the ``rephase`` command can run it over a recorded trace.

Each container goes through booting, running and shutdown:

* **booting** from its start. The runtime's syscalls after the seccomp filter
  is installed (runc init, before it execs the entrypoint) come before
  Docker's ``start`` event, and they belong to booting too.
* **running** from the time the detector reports (``Readiness.time``).
* **shutdown** from the first stop signal that reaches the container's init
  process: the kernel time of the signal (a SignalRecord from the audit
  sources' rule), or Docker's ``kill`` event with the container's stop signal
  or SIGKILL, or its ``stop`` event, whichever is earliest. Docker logs its
  kill event after the signal has reached the container, so the kernel time
  is the exact boundary and Docker's time is the fallback.

``speaker.phase_boundaries`` places each event once the boundaries around
its times are final. Events are held until then. Before the detector fires
that means holding every syscall of the container. After it fires, a time
before the stop waits until ``lag`` has passed beyond it, because a stop
event (Docker's, or a kernel signal read late) can arrive after records that
follow it. Only a stop from the kernel is final at once: a stop from Docker
can still move earlier when the kernel's record of the signal arrives.
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
    SignalRecord,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)
from speaker.phase_boundaries import Boundaries, SyscallEvent, place, times_of


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
    """Return the time an event is about: kernel record time for syscalls and signals, Docker's time for lifecycle events."""
    if isinstance(event, SyscallCounts):
        return event.end_time
    if isinstance(event, (SyscallRecord, SignalRecord)):
        return event.record_time
    if isinstance(event, ContainerEvent):
        return event.event_time or event.wall_time
    return event.wall_time


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
        #: Host pid of the container's init process, 0 until a start event names it.
        self.init_pid = 0
        #: The container's stop signal number, from its lifecycle events.
        self.stop_signal: int | None = None
        self.detector: Detector | None = None
        self.readiness: Readiness | None = None
        self.boundaries = Boundaries()
        self.exit_time: float | None = None
        self.exit_code: int | None = None
        #: Reason token of the TraceIncomplete sent for this container, if any.
        self.incomplete: str | None = None
        #: The last phase announced with a PhaseChange, None before booting.
        self.phase: Phase | None = None
        self.held: list[SyscallEvent] = []
        #: Reason and detector of the stop, announced once the stop is final.
        self._stop_reason = ""
        self._stop_detector = ""
        #: Latest call time already released without shutdown, for the late stop warning.
        self._released_before_stop = float("-inf")
        self._signals_ignored: set[int] = set()

    @property
    def run_time(self) -> float | None:
        return self.boundaries.run

    @property
    def stop_time(self) -> float | None:
        return self.boundaries.stop

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
        if event.stop_signal is not None:
            self.stop_signal = event.stop_signal
        action = event.action
        if action == ContainerAction.START:
            if event.pid:
                self.init_pid = event.pid
            self._start(when, out)
            self.observe(event, out)
        elif action == ContainerAction.KILL:
            stop_signal = event.stop_signal or signal.SIGTERM
            if event.signal in (stop_signal, signal.SIGKILL):
                reason = f"Docker sent {signal_name(event.signal)}"
                if event.signal == stop_signal:
                    reason += ", the container's stop signal"
                self._stop(when, reason, "kill", False, out)
            else:
                self.log.info(
                    "kill_ignored",
                    container=self.container_id,
                    signal=signal_name(event.signal or 0),
                    reason="not the stop signal, so the container keeps running",
                )
        elif action == ContainerAction.STOP:
            self._stop(when, "Docker stopped the container", "stop", False, out)
        elif action == ContainerAction.DIE:
            self.exit_time = when
            self.exit_code = event.exit_code
        else:
            self.observe(event, out)

    def signal(self, event: SignalRecord, out: list[Event]) -> None:
        """Start the shutdown at a stop signal that the kernel saw reach the init process from outside."""
        stop_signal = self.stop_signal or signal.SIGTERM
        if event.from_container or (self.init_pid and event.pid != self.init_pid):
            # Processes of a container signal each other (postgres does), and
            # Docker's stop signal goes to the init process from outside.
            return
        if event.signal not in (stop_signal, signal.SIGKILL):
            if event.signal not in self._signals_ignored:
                self._signals_ignored.add(event.signal)
                self.log.info(
                    "signal_ignored",
                    container=self.container_id,
                    signal=signal_name(event.signal),
                    sender=event.sender_comm,
                    reason="not the stop signal, so the container keeps running",
                )
            return
        reason = f"{event.sender_comm or 'pid ' + str(event.sender_pid)} sent {signal_name(event.signal)}"
        if event.signal == stop_signal:
            reason += ", the container's stop signal"
        self._stop(event.record_time, reason + f" ({event.syscall}, kernel time)", "signal", True, out)

    def _start(self, when: float, out: list[Event]) -> None:
        if self.started_at is not None:
            # TODO: a restarted container keeps the phases of its first life, so
            # the second boot lands in whatever phase the first one ended in.
            self.log.warning("container_restarted", container=self.container_id, reason="restarts are not traced apart")
            return
        self.started_at = when
        self.detector = self.settings.detector.create(when)
        self._announce(Phase.BOOTING, "the container started", "start", when, out)

    def _stop(self, when: float, reason: str, detector: str, from_kernel: bool, out: list[Event]) -> None:
        """Take ``when`` as the start of shutdown unless an earlier stop is known."""
        boundaries = self.boundaries
        if boundaries.stop is not None and (boundaries.stop < when or boundaries.stop_from_kernel):
            return
        if self.phase == Phase.SHUTDOWN:
            # The shutdown was announced from Docker's event after ``lag``, and its syscalls were placed.
            if from_kernel:
                self.log.warning(
                    "late_stop_signal",
                    container=self.container_id,
                    detail="the kernel's record of the stop signal arrived after the shutdown was announced "
                    "from Docker's later event; the shutdown keeps Docker's time",
                )
            return
        if when <= self._released_before_stop:
            self.log.warning(
                "late_stop_event",
                container=self.container_id,
                detector=detector,
                detail="some syscalls after the stop were already written to running, because the stop "
                "event arrived later than lag; running only gains syscalls from this",
            )
        boundaries.stop = when
        boundaries.stop_from_kernel = from_kernel
        self._stop_reason = reason
        self._stop_detector = detector
        if from_kernel:
            self._announce_stop(out)

    def _announce_stop(self, out: list[Event]) -> None:
        stop = self.boundaries.stop
        if stop is not None and self.phase != Phase.SHUTDOWN:
            self._announce(Phase.SHUTDOWN, self._stop_reason, self._stop_detector, stop, out)

    # --- Decisions ----------------------------------------------------------

    def _ready(self, readiness: Readiness | None, out: list[Event]) -> None:
        if readiness is None or self.readiness is not None or self.incomplete is not None:
            return
        stop = self.boundaries.stop
        if stop is not None and readiness.time >= stop:
            self.log.info("readiness_after_stop", container=self.container_id, detector=readiness.detector)
            return
        self.readiness = readiness
        self.boundaries.run = readiness.time
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
        stop = self.boundaries.stop
        end = stop if stop is not None else self.exit_time
        if end is None:
            if final:
                self._incomplete(
                    "ended_while_booting", f"the trace ended before {described} found the container ready", out
                )
            return
        if not final and complete_before <= end:
            return
        if stop is not None:
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
        stop = self.boundaries.stop
        if stop is not None and self._stop_is_final(complete_before, final=False):
            self._announce_stop(out)
        self._release(complete_before, final=False, out=out)

    def finish(self, out: list[Event]) -> None:
        """Release everything at the end of input."""
        if self.phase is None:
            self._announce(Phase.BOOTING, "the container started", "start", self.started_at or 0.0, out)
        self._check_booting_end(float("inf"), True, out)
        self._announce_stop(out)
        self._release(float("inf"), final=True, out=out)

    def _stop_is_final(self, complete_before: float, final: bool) -> bool:
        """Return whether no earlier stop can arrive any more."""
        if final or self.boundaries.stop_from_kernel:
            return True
        if self.exit_time is not None and complete_before > self.exit_time:
            return True
        stop = self.boundaries.stop
        return stop is not None and complete_before > stop

    def _decided(self, time: float, complete_before: float, final: bool) -> bool:
        """Return whether the phases of a call at ``time`` can no longer change."""
        if final:
            return True
        boundaries = self.boundaries
        if boundaries.stop is not None and time >= boundaries.stop:
            return True  # shutdown, and an earlier stop would keep it there
        if boundaries.run is None:
            if self.readiness is None and self.incomplete is None:
                return False  # the detector may still fire before it
        elif time < boundaries.run:
            return True
        # Before the stop: a stop, or an earlier one, may still arrive.
        return self._stop_is_final(complete_before, final) or time < complete_before

    def _release(self, complete_before: float, final: bool, out: list[Event]) -> None:
        if not self.held:
            return
        if not final and self.readiness is None and self.incomplete is None and self.boundaries.stop is None:
            return  # still booting: nothing can be placed before the detector decides
        kept: list[SyscallEvent] = []
        for event in self.held:
            times = times_of(event)
            if not all(self._decided(time, complete_before, final) for time in times):
                kept.append(event)
                continue
            pieces = place(event, self.boundaries)
            if not any(piece.phase == Phase.SHUTDOWN for piece in pieces):
                self._released_before_stop = max(self._released_before_stop, max(times))
            out.extend(pieces)
        self.held = kept


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
        elif isinstance(event, SignalRecord) and container_id in self.containers:
            self.containers[container_id].signal(event, out)
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
