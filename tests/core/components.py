"""Components for the engine tests, loaded by import path from pipeline files."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import anyio

from speaker.component import Batch, Output, Sink, Source, Stage
from speaker.engine import ExitCode
from speaker.events import Event, PhaseChange, SyscallRecord
from speaker.options import Duration, option


@dataclasses.dataclass(frozen=True)
class CountingSourceOptions:
    count: int = option(0, help="Records to emit; 0 emits until stopped.")
    log_path: str = option("", help="JSON lines file that records how many events were sent, and when.")


class CountingSource(Source):
    """Emit one SyscallRecord at a time and log the running total after every send."""

    type_name = "counting_source"
    Options = CountingSourceOptions
    emits = (SyscallRecord,)

    async def run(self, output: Output) -> None:
        sent = 0
        log = open(self.options.log_path, "w") if self.options.log_path else None
        try:
            while not self.stopping.is_set() and (self.options.count == 0 or sent < self.options.count):
                await output.send(SyscallRecord(container_id="c", pid=1, arch="x86_64", nr=0, serial=sent + 1))
                sent += 1
                if log:
                    log.write(json.dumps({"sent": sent, "time": time.monotonic()}) + "\n")
                    log.flush()
        finally:
            if log:
                log.close()


@dataclasses.dataclass(frozen=True)
class SlowSinkOptions:
    delay: Duration = option(Duration(0.01), help="Time spent per batch.")
    log_path: str = option("", help="JSON lines file that records each received batch.")


class SlowSink(Sink):
    """Take ``delay`` per batch and record what arrived, to show backpressure."""

    type_name = "slow_sink"
    Options = SlowSinkOptions
    accepts = (Event,)

    async def setup(self) -> None:
        self.received = 0
        self._log = open(self.options.log_path, "w") if self.options.log_path else None

    async def write_batch(self, batch: Batch) -> None:
        await anyio.sleep(self.options.delay)
        self.received += len(batch)
        if self._log:
            self._log.write(json.dumps({"received": self.received, "time": time.monotonic()}) + "\n")
            self._log.flush()

    async def teardown(self) -> None:
        if self._log:
            self._log.close()


@dataclasses.dataclass(frozen=True)
class FailingStageOptions:
    fail_at: int = option(help="Raise on this event number (1-based).")


class FailingStage(Stage):
    """Forward events, and raise ValueError on event number ``fail_at``."""

    type_name = "failing_stage"
    Options = FailingStageOptions
    accepts = (Event,)
    emits = (SyscallRecord,)

    async def setup(self) -> None:
        self.seen = 0

    async def process(self, event: Event, output: Output) -> None:
        self.seen += 1
        if self.seen == self.options.fail_at:
            raise ValueError(f"test failure at event {self.seen}")
        await output.send(event)


class StubbornSource(Source):
    """Ignore stop requests: the only way out is an abort."""

    type_name = "stubborn_source"
    emits = (SyscallRecord,)
    drain_timeout = 3600.0

    async def run(self, output: Output) -> None:
        await output.send(SyscallRecord(container_id="c", pid=1, arch="x86_64", nr=0))
        await anyio.sleep(3600)


@dataclasses.dataclass(frozen=True)
class MarkerSinkOptions:
    path: Path = option(help="File written at teardown, to show that teardown ran.")


class MarkerSink(Sink):
    """Discard events and write a marker file at teardown."""

    type_name = "marker_sink"
    Options = MarkerSinkOptions
    accepts = (Event,)

    async def write_batch(self, batch: Batch) -> None:
        pass

    async def teardown(self) -> None:
        self.options.path.write_text("teardown ran\n")


class PhaseOnlySink(Sink):
    """Accept only PhaseChange events, to test event-type validation."""

    type_name = "phase_only_sink"
    accepts = (PhaseChange,)

    async def write(self, event: Event) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class SlowSetupStageOptions:
    delay: Duration = option(Duration(0), help="Time setup takes.")
    fail: bool = option(False, help="Raise at the end of setup.")


class SlowSetupStage(Stage):
    """Take ``delay`` to set up, then optionally fail, to test stops during setup."""

    type_name = "slow_setup_stage"
    Options = SlowSetupStageOptions
    accepts = (Event,)
    emits = (SyscallRecord,)

    async def setup(self) -> None:
        await anyio.sleep(self.options.delay)
        if self.options.fail:
            raise RuntimeError("setup failed on purpose")

    async def process(self, event: Event, output: Output) -> None:
        await output.send(event)


class BrokenInitSink(Sink):
    """Raise in the constructor."""

    type_name = "broken_init_sink"
    accepts = (Event,)

    def __init__(self, *args: object) -> None:
        raise ValueError("constructor failed on purpose")


@dataclasses.dataclass(frozen=True)
class ProblemSinkOptions:
    code: int = option(3, help="Exit code of the problem the sink reports at teardown.")


class ProblemSink(Sink):
    """Report one problem with exit code ``code`` when the pipeline ends."""

    type_name = "problem_sink"
    Options = ProblemSinkOptions
    accepts = (Event,)

    async def write_batch(self, batch: Batch) -> None:
        pass

    async def flush(self) -> None:
        self.context.report_problem(ExitCode(self.options.code), f"problem with exit code {self.options.code}")
