"""Events per second through the engine against bare anyio memory-stream loops.

Run: .venv/bin/python bench/engine.py [--events N]

All three variants move the same pre-built SyscallRecord events through a
source -> stage -> sink chain in one process, one after the other in the
same run:

* engine: a pipeline file with a pass-through stage that handles one event
  per ``process`` call (the slowest form a stage can take) and a counting
  sink, run by speaker.engine;
* bare, per event: three tasks joined by two anyio memory object streams,
  one send per event;
* bare, batched: the same tasks sending lists of 256 events, where the
  middle task awaits one coroutine per event as a stage's ``process`` does.

Targets: at least 100k events/s through the engine, and the engine within
1.5x of the bare per-event loop (ratio >= 0.67).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import anyio

from speaker.component import Output, Source, Stage
from speaker.config import load_pipeline
from speaker.engine import Engine
from speaker.events import SyscallRecord
from speaker.options import option

BATCH = 256


def make_events(count: int) -> list[SyscallRecord]:
    return [SyscallRecord(container_id="bench", pid=1, arch="x86_64", nr=index % 300, serial=index) for index in range(count)]


EVENTS: list[SyscallRecord] = []


@dataclasses.dataclass(frozen=True)
class PrebuiltOptions:
    batch: int = option(BATCH, help="Events per send.")


class PrebuiltSource(Source):
    """Send the module's pre-built events, so the benchmark measures transport only."""

    type_name = "prebuilt"
    Options = PrebuiltOptions
    emits = (SyscallRecord,)

    async def run(self, output: Output) -> None:
        size = self.options.batch
        for start in range(0, len(EVENTS), size):
            await output.send_many(EVENTS[start : start + size])


class PassThrough(Stage):
    """Forward each event through ``process``, as most stages are written."""

    type_name = "pass_through"
    accepts = (SyscallRecord,)
    emits = (SyscallRecord,)

    async def process(self, event: SyscallRecord, output: Output) -> None:
        await output.send(event)


def engine_rate(count: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        pipeline = Path(directory) / "bench.toml"
        pipeline.write_text(
            f"""
[sources.events]
type = "{__name__}:PrebuiltSource"

[stages.pass]
type = "{__name__}:PassThrough"
inputs = ["events"]

[sinks.count]
type = "count"
inputs = ["pass"]
"""
        )
        spec = load_pipeline(pipeline)
    engine = Engine(spec, handle_signals=False)
    engine.build()
    started = time.perf_counter()
    result = anyio.run(engine.run)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result
    assert engine.components["count"].total == count
    return count / elapsed


async def bare_loop(events: list[SyscallRecord], batched: bool) -> int:
    first_send, first_receive = anyio.create_memory_object_stream(8 if batched else 8 * BATCH)
    second_send, second_receive = anyio.create_memory_object_stream(8 if batched else 8 * BATCH)
    received = 0

    async def produce() -> None:
        async with first_send:
            if batched:
                for start in range(0, len(events), BATCH):
                    await first_send.send(events[start : start + BATCH])
            else:
                for event in events:
                    await first_send.send(event)

    async def handle(event: SyscallRecord, out: list[SyscallRecord]) -> None:
        out.append(event)

    async def forward() -> None:
        async with first_receive, second_send:
            async for item in first_receive:
                if batched:
                    out: list[SyscallRecord] = []
                    for event in item:
                        await handle(event, out)
                    item = out
                await second_send.send(item)

    async def consume() -> None:
        nonlocal received
        async with second_receive:
            async for item in second_receive:
                received += len(item) if batched else 1

    async with anyio.create_task_group() as group:
        group.start_soon(produce)
        group.start_soon(forward)
        group.start_soon(consume)
    return received


def bare_rate(count: int, batched: bool) -> float:
    started = time.perf_counter()
    received = anyio.run(bare_loop, EVENTS, batched)
    elapsed = time.perf_counter() - started
    assert received == count
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events per variant (default 1000000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best rate of each variant counts")
    args = parser.parse_args()
    EVENTS.extend(make_events(args.events))

    rates = {"engine": 0.0, "bare per event": 0.0, "bare batched": 0.0}
    for _ in range(args.rounds):
        rates["engine"] = max(rates["engine"], engine_rate(args.events))
        rates["bare per event"] = max(rates["bare per event"], bare_rate(args.events, batched=False))
        rates["bare batched"] = max(rates["bare batched"], bare_rate(args.events, batched=True))

    print(f"events per variant: {args.events}, best of {args.rounds} rounds")
    for name, rate in rates.items():
        print(f"  {name:16} {rate / 1e3:10.0f}k events/s")
    print(f"engine / bare per event: {rates['engine'] / rates['bare per event']:.2f} (target >= 0.67, within 1.5x)")
    print(f"engine / bare batched:   {rates['engine'] / rates['bare batched']:.2f}")
    print(f"engine end to end: {'meets' if rates['engine'] >= 100_000 else 'misses'} the 100k events/s target")


if __name__ == "__main__":
    main()
