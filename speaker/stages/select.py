"""Pass on only the events that match a type and container filter."""

from __future__ import annotations

import dataclasses

from speaker.component import Batch, Output, Stage
from speaker.events import Event, event_types
from speaker.options import OptionError, option


@dataclasses.dataclass(frozen=True)
class SelectOptions:
    types: list[str] = option([], help='Event class names to keep, such as ["PhaseChange", "Violation"]; empty keeps all.')
    containers: list[str] = option(
        [], help="Container ids or id prefixes to keep; empty keeps all, including unattributed events."
    )


class Select(Stage):
    """Keep events whose type and container match, and drop the rest."""

    type_name = "select"
    Options = SelectOptions
    accepts = (Event,)
    emits = (Event,)

    @classmethod
    def check_options(cls, options: SelectOptions) -> None:
        known = event_types()
        for index, name in enumerate(options.types):
            if name not in known:
                raise OptionError(f"unknown event type {name!r}; known types: {', '.join(sorted(known))}", f"types[{index}]")

    async def setup(self) -> None:
        known = event_types()
        self._types = tuple(known[name] for name in self.options.types)
        self._prefixes = tuple(self.options.containers)

    async def process(self, event: Event, output: Output) -> None:
        await self.process_batch((event,), output)

    async def process_batch(self, batch: Batch, output: Output) -> None:
        selected = batch
        if self._types:
            selected = [event for event in selected if isinstance(event, self._types)]
        if self._prefixes:
            selected = [event for event in selected if event.container_id.startswith(self._prefixes)]
        await output.send_many(selected)
