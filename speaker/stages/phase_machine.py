"""Split each container's syscalls into booting, running and shutdown."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

from speaker.component import Output, Stage
from speaker.detectors import parse_detector
from speaker.engine import ExitCode
from speaker.events import (
    ContainerEvent,
    ContainerOutput,
    Event,
    PhaseChange,
    ProcessSample,
    RecordLoss,
    SignalRecord,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)
from speaker.options import Duration, OptionError, option
from speaker.phase_tracker import PhaseMachine as Tracker
from speaker.phase_tracker import PhaseSettings


@dataclasses.dataclass(frozen=True)
class PhaseMachineOptions:
    detector: str | dict[str, Any] = option(
        "window",
        help='Readiness detector that ends booting: a type name such as "window", a table such as '
        '{ type = "listen", port = 6379 }, or { any = [...] } / { all = [...] } of detectors (see docs/tracing.md).',
    )
    ready_timeout: Duration = option(
        Duration.parse("2m"),
        help="Maximum time from the container's start to readiness. After it, the trace is marked "
        "incomplete and its syscalls stay in booting.",
    )
    lag: Duration = option(
        Duration.parse("1s"),
        help="Maximum delay between an event's own time and its arrival here. Syscalls are held this long "
        "before they are assigned to running, in case a stop (Docker's kill event, or the kernel's record of "
        "the stop signal) comes after them.",
    )
    report_not_ready: bool = option(
        True,
        help="Report a container that exits, is stopped or times out before the detector finds it ready as an "
        "incomplete result (exit code 3), because its traced profile then lacks the running phase. Set false "
        "where a later stage reports it, as the enforce stage does; TraceIncomplete goes downstream either way.",
    )
    clock: Literal["wall", "events"] = option(
        "wall",
        help='"wall" lets time pass with the system clock (live tracing); "events" only with the times of the '
        "events read (replaying a recorded trace).",
    )


class PhaseMachine(Stage):
    """Tag syscall events with their container's phase and emit a PhaseChange at every boundary.

    Booting starts with the container, running when the detector fires, and
    shutdown at the first stop signal: the kernel's record of it (a
    SignalRecord) or Docker's kill event with the stop signal (or its stop
    event). Syscall events are held until their phases are known; other events
    pass through at once.
    """

    type_name = "phase_machine"
    Options = PhaseMachineOptions
    accepts = (SyscallCounts, SyscallRecord, SignalRecord, RecordLoss, ContainerEvent, ContainerOutput, ProcessSample)
    emits = (
        SyscallCounts,
        SyscallRecord,
        SignalRecord,
        RecordLoss,
        ContainerEvent,
        ContainerOutput,
        ProcessSample,
        PhaseChange,
        TraceIncomplete,
    )
    tick_interval = 0.25

    @classmethod
    def check_options(cls, options: PhaseMachineOptions) -> None:
        try:
            parse_detector(options.detector)
        except OptionError as exc:
            raise OptionError(str(exc), "detector" + exc.key_path) from None

    async def setup(self) -> None:
        options = self.options
        self.detector = parse_detector(options.detector)
        settings = PhaseSettings(self.detector, float(options.ready_timeout), float(options.lag))
        self.tracker = Tracker(settings, self.log)
        self.log.info("phase_detector", detector=self.detector.describe(), ready_timeout=str(options.ready_timeout))

    def _now(self) -> float:
        if self.options.clock == "wall":
            return max(time.time(), self.tracker.latest)
        return self.tracker.latest

    async def process(self, event: Event, output: Output) -> None:
        await self._send(self.tracker.feed(event), output)
        if not isinstance(event, (SyscallCounts, SyscallRecord)):
            # Lifecycle events and samples are few, and each can decide a
            # phase (a kill, a readiness), so time advances at once for them.
            # Syscall events wait for the next tick.
            await self._send(self.tracker.advance(self._now()), output)

    async def tick(self, now: float, output: Output) -> None:
        await self._send(self.tracker.advance(self._now()), output)

    async def finish(self, output: Output) -> None:
        await self._send(self.tracker.advance(self._now()), output)
        await self._send(self.tracker.finish(), output)

    async def _send(self, events: list[Event], output: Output) -> None:
        for event in events:
            if isinstance(event, PhaseChange):
                self.log.info(
                    "phase_change",
                    container=event.container_id[:12],
                    phase=str(event.phase),
                    previous=str(event.previous) if event.previous else None,
                    detector=event.detector,
                    reason=event.reason,
                    start_time=round(event.start_time, 3),
                )
            elif isinstance(event, TraceIncomplete):
                container = event.container_id[:12]
                if not self.options.report_not_ready:
                    self.log.warning("not_found_ready", container=container, reason=event.reason, detail=event.detail)
                    continue
                self.log.error("trace_incomplete", container=container, reason=event.reason, detail=event.detail)
                self.context.report_problem(
                    ExitCode.INCOMPLETE, f"container {container}: {event.detail}; its profile is marked incomplete"
                )
        await output.send_many(events)
