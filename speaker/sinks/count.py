"""Count events by type and log the totals when the pipeline ends."""

from __future__ import annotations

import collections

from speaker.component import Batch, Sink
from speaker.events import Event


class Count(Sink):
    """Count the events it receives per type; useful as a placeholder and in benchmarks."""

    type_name = "count"
    accepts = (Event,)

    async def setup(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.total = 0

    async def write_batch(self, batch: Batch) -> None:
        self.total += len(batch)
        self.counts.update(type(event).__name__ for event in batch)

    async def flush(self) -> None:
        self.log.info("event_counts", total=self.total, **dict(self.counts))
