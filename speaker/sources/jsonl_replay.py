"""Replay events recorded by the ``jsonl`` sink."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import aiofiles

from speaker.component import Output, Source
from speaker.errors import ComponentError
from speaker.events import Event, event_from_dict
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class JsonlReplayOptions:
    path: Path = option(help="JSON lines file written by the jsonl sink.")
    skip_invalid: bool = option(
        False, help="Skip lines that are not valid events (counted in the log) instead of failing."
    )


class JsonlReplay(Source):
    """Read events from a JSON lines file, one event per line, and emit them in order."""

    type_name = "jsonl_replay"
    Options = JsonlReplayOptions
    emits = (Event,)

    async def setup(self) -> None:
        path = self.options.path
        if path.exists() and not path.is_file():
            # Opening a FIFO would block in a worker thread that no signal can cancel.
            raise ComponentError(f"{path} is not a regular file; set path to a file written by the jsonl sink")

    async def run(self, output: Output) -> None:
        path = self.options.path
        try:
            async with aiofiles.open(path, "rb") as handle:
                emitted, skipped = await self._replay(handle, output)
        except OSError as exc:
            raise ComponentError(f"cannot read {path}: {exc.strerror}") from exc
        if skipped:
            self.log.warning("invalid_lines_skipped", path=str(path), skipped=skipped)
        self.log.info("replay_finished", path=str(path), events=emitted)

    async def _replay(self, handle: Any, output: Output) -> tuple[int, int]:
        """Emit the events of an open file; return how many were emitted and skipped."""
        path = self.options.path
        emitted = skipped = number = 0
        batch: list[Event] = []
        async for line in handle:
            number += 1
            if not line.strip():
                continue
            try:
                batch.append(event_from_dict(json.loads(line.decode("utf-8"))))
            except (ValueError, TypeError, RecursionError) as exc:
                if not self.options.skip_invalid:
                    # Deliver the valid events before the bad line, then stop.
                    await output.send_many(batch)
                    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                    raise ComponentError(
                        f"{path}:{number}: invalid event: {reason}; fix the line or set skip_invalid = true"
                    ) from exc
                skipped += 1
                continue
            if len(batch) >= 256:
                await output.send_many(batch)
                emitted += len(batch)
                batch = []
        await output.send_many(batch)
        emitted += len(batch)
        return emitted, skipped
