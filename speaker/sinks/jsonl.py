"""Write events as JSON lines."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import aiofiles

from speaker.component import Batch, Input, Sink
from speaker.errors import ComponentError
from speaker.events import Event
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class JsonlOptions:
    path: str = option(help='Output file, or "-" for standard output. Parent directories are created.')
    append: bool = option(False, help="Append to an existing file instead of replacing it.")
    types: list[str] = option([], help="Event class names to write, such as [\"Violation\"]; empty writes all.")


class Jsonl(Sink):
    """Write each event as one JSON object per line (``Event.to_dict``), readable by ``jsonl_replay``."""

    type_name = "jsonl"
    Options = JsonlOptions
    accepts = (Event,)

    async def setup(self) -> None:
        self._file = None
        self.written = 0
        if self.options.path == "-":
            return
        # Check now that the file can be written, but open it only when the
        # pipeline runs: a run that fails during setup must not truncate the
        # previous run's output.
        path = Path(self.options.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ComponentError(f"cannot create the directory of {path}: {exc.strerror}") from exc
        if path.exists() and not path.is_file():
            # Opening a FIFO would block in a worker thread that no signal can cancel.
            raise ComponentError(f"{path} is not a regular file; set path to a file name, or \"-\" for standard output")
        if path.exists() and not os.access(path, os.W_OK):
            raise ComponentError(f"cannot write {path}: permission denied")

    async def _open(self) -> None:
        path = Path(self.options.path)
        try:
            self._file = await aiofiles.open(path, "a" if self.options.append else "w", encoding="utf-8")
        except OSError as exc:
            raise ComponentError(f"cannot open {path} for writing: {exc.strerror}") from exc

    async def run(self, input: Input) -> None:
        if self.options.path != "-":
            await self._open()
        await super().run(input)

    async def write_batch(self, batch: Batch) -> None:
        wanted = self.options.types
        lines = [
            json.dumps(event.to_dict(), separators=(",", ":")) + "\n"
            for event in batch
            if not wanted or type(event).__name__ in wanted
        ]
        if not lines:
            return
        if self._file is None:
            sys.stdout.write("".join(lines))
        else:
            await self._file.write("".join(lines))
        self.written += len(lines)

    async def flush(self) -> None:
        if self._file is None:
            sys.stdout.flush()
            return
        await self._file.flush()
        os.fsync(self._file.fileno())

    async def teardown(self) -> None:
        if self._file is not None:
            await self._file.close()
            self.log.info("jsonl_closed", path=self.options.path, events=self.written)
