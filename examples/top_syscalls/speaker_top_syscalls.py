"""An example custom stage: the most frequent syscalls per container and phase.

It passes every syscall event through unchanged, so it can sit anywhere
between a source and a sink, and when its input ends it emits one
SyscallTop event per container and phase. docs/custom-stages.md walks
through this file.
"""

from __future__ import annotations

import collections
import dataclasses

from speaker.component import Output, Stage
from speaker.events import Event, SyscallCounts, SyscallRecord, event_type
from speaker.options import option


@event_type
class SyscallTop(Event):
    """The ``limit`` most frequent syscalls of one container in one phase."""

    phase: str
    #: (syscall, count) pairs, most frequent first. The syscall is its name
    #: when classified, otherwise "ARCH:NUMBER".
    top: tuple[tuple[str, int], ...]
    total: int


@dataclasses.dataclass(frozen=True)
class TopSyscallsOptions:
    limit: int = option(10, min=1, help="Number of syscalls to report per container and phase.")


class TopSyscalls(Stage):
    """Count syscalls per container and phase, and emit the most frequent ones at the end."""

    type_name = "top_syscalls"
    Options = TopSyscallsOptions
    accepts = (SyscallRecord, SyscallCounts)
    emits = (SyscallRecord, SyscallCounts, SyscallTop)

    async def setup(self) -> None:
        self.counters: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)

    async def process(self, event: Event, output: Output) -> None:
        if isinstance(event, SyscallRecord):
            phase = event.phase.value if event.phase else "unknown"
            label = event.name or f"{event.arch}:{event.nr}"
            self.counters[(event.container_id, phase)][label] += 1
        elif isinstance(event, SyscallCounts):
            phase = event.phase.value if event.phase else "unknown"
            counter = self.counters[(event.container_id, phase)]
            for key, count in event.counts.items():
                counter[key.name or f"{key.arch}:{key.nr}"] += count
        await output.send(event)

    async def finish(self, output: Output) -> None:
        for (container_id, phase), counter in sorted(self.counters.items()):
            top = tuple(counter.most_common(self.options.limit))
            await output.send(
                SyscallTop(container_id=container_id, phase=phase, top=top, total=sum(counter.values()))
            )
            self.log.info("top_syscalls", container=container_id, phase=phase, top=top[:3])
