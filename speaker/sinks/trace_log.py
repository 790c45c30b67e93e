"""Write a trace as JSON lines that ``rephase`` can split into phases again."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import aiofiles

from speaker.component import Batch, Input, Sink
from speaker.errors import ComponentError
from speaker.events import (
    ContainerEvent,
    ContainerOutput,
    Phase,
    PhaseChange,
    ProcessSample,
    RecordLoss,
    SignalRecord,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)
from speaker.keep_earlier import check_output_file, keep_earlier_file
from speaker.options import Duration, option
from speaker.trace_file import FORMAT_VERSION, HEADER_TYPE, ROW_TYPE


@dataclasses.dataclass(frozen=True)
class TraceLogOptions:
    path: Path = option(
        help="Output file. Parent directories are created. A non-empty file from an earlier run is renamed "
        "after its header's time, such as trace.2026-12-04T23-59-01Z.jsonl, so the newest trace is always at path."
    )
    samples: bool = option(
        True, help="Also write ProcessSample events, which the listen and quiescence detectors need to rephase."
    )
    flush_every: Duration = option(
        Duration.parse("5s"), help="Maximum time syscall rows stay in memory before they are written."
    )


@dataclasses.dataclass
class _Row:
    start_time: float
    end_time: float
    #: Calls per syscall name, per arch.
    syscalls: dict[str, dict[str, int]]
    #: First and last record time per syscall name, per arch, for the calls whose source tracks them.
    spans: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)


class TraceLog(Sink):
    """Write per-second, per-container syscall sets and the lifecycle, phase and sample events as JSON lines.

    Each syscall row covers one container, one second of kernel record time
    and one phase, with the exact first and last record times it contains,
    and those of each syscall when the audit sources tracked them. A row is
    written when it is ``flush_every`` old, so a later event of the same
    second can produce a second row with the same key: readers merge them.
    """

    type_name = "trace_log"
    Options = TraceLogOptions
    accepts = (
        SyscallCounts,
        SyscallRecord,
        SignalRecord,
        ContainerEvent,
        ContainerOutput,
        ProcessSample,
        PhaseChange,
        TraceIncomplete,
        RecordLoss,
    )

    async def setup(self) -> None:
        # The file is opened only when the pipeline runs, so a run that fails
        # during setup leaves the earlier trace log where it was.
        check_output_file(self.options.path, "trace log", "path")
        self._file = None
        self._rows: dict[tuple[str, int, str], _Row] = {}
        self._last_write = time.monotonic()
        self.rows_written = 0
        self.events_written = 0

    async def run(self, input: Input) -> None:
        path = self.options.path
        kept = keep_earlier_file(path, _header_time(path))
        if kept is not None:
            self.log.info("trace_log_kept", path=str(path), moved_to=str(kept))
        try:
            self._file = await aiofiles.open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise ComponentError(f"cannot open {path} for writing: {exc.strerror}") from exc
        header = {"type": HEADER_TYPE, "version": FORMAT_VERSION, "created": time.time()}
        await self._file.write(json.dumps(header) + "\n")
        await super().run(input)

    async def write_batch(self, batch: Batch) -> None:
        lines: list[str] = []
        for event in batch:
            if isinstance(event, SyscallCounts):
                calls = ((key.arch, key.name, count) for key, count in event.counts.items())
                row = self._add(event.container_id, event.phase, event.start_time, event.end_time, calls)
                for key, (first, last) in event.spans.items():
                    names = row.spans.setdefault(key.arch, {})
                    span = names.get(key.name)
                    if span is None:
                        names[key.name] = [first, last]
                    else:
                        span[0] = min(span[0], first)
                        span[1] = max(span[1], last)
            elif isinstance(event, SyscallRecord):
                calls = ((event.arch, event.name, 1),)
                self._add(event.container_id, event.phase, event.record_time, event.record_time, calls)
            elif isinstance(event, ProcessSample) and not self.options.samples:
                continue
            else:
                lines.append(json.dumps(event.to_dict(), separators=(",", ":")))
        self.events_written += len(lines)
        if time.monotonic() - self._last_write >= self.options.flush_every:
            lines.extend(self._take_rows())
        if lines:
            await self._file.write("\n".join(lines) + "\n")

    def _add(
        self, container: str, phase: Phase | None, start: float, end: float, calls: Iterable[tuple[str, str, int]]
    ) -> _Row:
        row = self._row(container, phase, start, end)
        for arch, name, count in calls:
            names = row.syscalls.setdefault(arch, {})
            names[name] = names.get(name, 0) + count
        return row

    def _row(self, container: str, phase: Phase | None, start: float, end: float) -> _Row:
        key = (container, math.floor(start), str(phase) if phase is not None else "")
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(start, end, {})
        else:
            row.start_time = min(row.start_time, start)
            row.end_time = max(row.end_time, end)
        return row

    def _take_rows(self) -> list[str]:
        lines = []
        for (container, second, phase), row in sorted(self._rows.items(), key=lambda item: item[0][1]):
            data = {
                "type": ROW_TYPE,
                "container_id": container,
                "second": second,
                "phase": phase or None,
                "start_time": row.start_time,
                "end_time": row.end_time,
                "syscalls": {arch: dict(sorted(names.items())) for arch, names in sorted(row.syscalls.items())},
            }
            if row.spans:
                data["spans"] = {arch: dict(sorted(names.items())) for arch, names in sorted(row.spans.items())}
            lines.append(json.dumps(data, separators=(",", ":")))
        self.rows_written += len(lines)
        self._rows.clear()
        self._last_write = time.monotonic()
        return lines

    async def flush(self) -> None:
        if self._file is None:
            return
        lines = self._take_rows()
        if lines:
            await self._file.write("\n".join(lines) + "\n")
        await self._file.flush()
        os.fsync(self._file.fileno())

    async def teardown(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            await file.close()
            self.log.info("trace_log_closed", path=str(self.options.path), rows=self.rows_written, events=self.events_written)


def _header_time(path: Path) -> float | None:
    """Return the ``created`` time of a trace log's header, or None when the first line is not such a header."""
    try:
        with path.open("rb") as file:
            header = json.loads(file.readline(4096))
    except (OSError, ValueError):
        return None
    created = header.get("created") if isinstance(header, dict) and header.get("type") == HEADER_TYPE else None
    return float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else None
