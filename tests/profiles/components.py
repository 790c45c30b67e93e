"""Test components for the profile tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from speaker.component import Output, Source
from speaker.events import Event, event_from_dict
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class EventFileOptions:
    path: Path = option(help="JSON lines file of events, as the jsonl sink writes them.")
    fail_after: int = option(-1, help="Raise after sending this many events; -1 never raises.")


class EventFile(Source):
    """Send the events of a jsonl file, then optionally fail, to test what sinks keep.

    The built-in jsonl_replay source reads the same files; this one adds
    ``fail_after``, and reads with plain blocking I/O, which a test can afford.
    """

    type_name = "event_file"
    Options = EventFileOptions
    emits = (Event,)

    async def run(self, output: Output) -> None:
        events = [event_from_dict(json.loads(line)) for line in self.options.path.read_text().splitlines() if line.strip()]
        limit = self.options.fail_after
        await output.send_many(events if limit < 0 else events[:limit])
        await output.flush()
        if limit >= 0:
            raise RuntimeError(f"event_file stopped on purpose after {limit} events")
