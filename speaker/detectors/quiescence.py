"""Ready when every task of the container waits in a syscall and the CPU stays idle."""

from __future__ import annotations

import dataclasses
import os

from speaker.detectors.base import Detector, Readiness
from speaker.events import Event, ProcessSample, TaskSample
from speaker.options import Duration, option

#: Clock ticks per second, the unit of ``TaskSample.cpu_ticks``.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class QuiescenceOptions:
    duration: Duration = option(
        Duration.parse("2s"), help="Time the container must stay quiescent, measured between process samples."
    )
    max_cpu: float = option(
        0.02,
        min=0.0,
        max=64.0,
        help="Maximum CPU use while quiescent, in CPUs (0.02 is 2% of one CPU), averaged over the quiescent time.",
    )


def is_waiting(task: TaskSample) -> bool:
    """Return whether a task sleeps inside a syscall, such as epoll_wait or accept."""
    return task.state in ("S", "I") and task.syscall is not None


class Quiescence(Detector):
    """Fire once all tasks have been blocked in syscalls, with the CPU idle, for ``duration``.

    A sample with a running task, a task in uninterruptible sleep (D), or no
    tasks at all restarts the quiescent interval.
    """

    type_name = "quiescence"
    Options = QuiescenceOptions
    accepts = (ProcessSample,)

    def __init__(self, options: QuiescenceOptions, started_at: float) -> None:
        super().__init__(options, started_at)
        #: First sample of the current quiescent interval, or None.
        self._quiet_since: ProcessSample | None = None

    def observe(self, event: Event) -> Readiness | None:
        if not isinstance(event, ProcessSample):
            return None
        if not event.tasks or not all(is_waiting(task) for task in event.tasks):
            self._quiet_since = None
            return None
        first = self._quiet_since
        # A task that exits takes its CPU time out of the sum: start over.
        if first is None or event.cpu_ticks < first.cpu_ticks:
            self._quiet_since = event
            return None
        elapsed = event.wall_time - first.wall_time
        if elapsed <= 0:
            return None
        cpu = (event.cpu_ticks - first.cpu_ticks) / CLOCK_TICKS / elapsed
        if cpu > self.options.max_cpu:
            self._quiet_since = event
            return None
        if elapsed < self.options.duration:
            return None
        reason = (
            f"all {len(event.tasks)} tasks waited in syscalls for {elapsed:.1f}s "
            f"using {cpu * 100:.1f}% of a CPU"
        )
        return Readiness(event.wall_time, self.type_name, reason)
