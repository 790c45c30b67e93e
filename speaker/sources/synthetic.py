"""A source of made-up syscall records, for benchmarks and tests of the engine."""

from __future__ import annotations

import dataclasses
import time

import anyio

from speaker.component import Output, Source
from speaker.events import SyscallRecord
from speaker.options import OptionError, option


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    count: int = option(1000, min=0, help="Number of records to emit; 0 emits until the pipeline stops.")
    rate: float = option(0.0, min=0.0, help="Records per second; 0 emits as fast as consumers accept them.")
    batch: int = option(256, min=1, help="Records sent per batch.")
    container_id: str = option("synthetic", help="Container id written into every record.")
    syscalls: list[int] = option([0, 1, 3, 9, 232], help="x86_64 syscall numbers to cycle through.")


class Synthetic(Source):
    """Emit SyscallRecord events with increasing serial numbers and no real kernel behind them."""

    type_name = "synthetic"
    Options = SyntheticOptions
    emits = (SyscallRecord,)
    # It checks ``stopping`` between batches, so a stop never cuts a batch in half.
    drain_timeout = 5.0

    @classmethod
    def check_options(cls, options: SyntheticOptions) -> None:
        if not options.syscalls:
            raise OptionError("the list is empty: give at least one syscall number", "syscalls")

    async def run(self, output: Output) -> None:
        self.emitted = 0
        try:
            await self._emit(output, self.options.syscalls, time.monotonic())
        finally:
            self.log.info("synthetic_finished", records=self.emitted)

    async def _emit(self, output: Output, numbers: list[int], started: float) -> None:
        options = self.options
        serial = 0
        while not self.stopping.is_set() and (options.count == 0 or serial < options.count):
            size = options.batch if options.count == 0 else min(options.batch, options.count - serial)
            now = time.time()
            batch = [
                SyscallRecord(
                    container_id=options.container_id,
                    pid=1000 + (serial + index) % 7,
                    arch="x86_64",
                    nr=numbers[(serial + index) % len(numbers)],
                    serial=serial + index + 1,
                    record_time=now,
                    source=self.name,
                )
                for index in range(size)
            ]
            await output.send_many(batch)
            serial = self.emitted = serial + size
            if options.rate > 0:
                delay = started + serial / options.rate - time.monotonic()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await self.stopping.wait()
            else:
                # Yield so that a stop request or a signal gets through.
                await anyio.lowlevel.checkpoint()
