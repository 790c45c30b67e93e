"""Turn parsed audit chunks and known losses into events, for both audit sources."""

from __future__ import annotations

import collections
import time
from typing import Any

from speaker.audit.chunks import ChunkResult
from speaker.audit.follow import MAX_LINE_LENGTH, LongLine
from speaker.engine import ExitCode, PipelineContext
from speaker.events import Event, RecordLoss, SignalRecord, SyscallCounts, SyscallKey, SyscallRecord

#: Seconds between two ``garbled_records`` (or ``out_of_range_records``)
#: warnings; lines in between are counted into the next one.
WARNING_INTERVAL = 10.0
_GARBLED_DETAIL = "lines that are not valid audit records were skipped"
_OUT_OF_RANGE_DETAIL = (
    "SECCOMP records with an arch other than x86_64 and x86, an impossible pid, or a syscall number that no "
    "profile can contain were skipped"
)


class AuditEvents:
    """Build one audit source's events and keep its totals for the final log line and problem report."""

    def __init__(self, source: str, log: Any, context: PipelineContext) -> None:
        self.source = source
        self.log = log
        self.context = context
        self.records = 0
        #: SignalRecords emitted so far.
        self.signals = 0
        self.lost: collections.Counter[str] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()
        # Per warning event (garbled_records, out_of_range_records): lines not yet
        # logged, the first of them, and the time of the last warning.
        self._unreported: collections.Counter[str] = collections.Counter()
        self._examples: dict[str, bytes] = {}
        self._last_warning: dict[str, float] = {}
        self._longest_skipped_line = 0

    def from_chunk(self, result: ChunkResult) -> list[Event]:
        """Return the events of a chunk: its signals, a SyscallCounts (and SyscallRecords, if kept), and a RecordLoss for its garbled lines.

        Signals come first, so that the phase machine has a stop before the
        syscalls that follow it.
        """
        events: list[Event] = [
            SignalRecord(
                pid=signal.pid,
                signal=signal.signal,
                sender_pid=signal.sender_pid,
                sender_comm=signal.sender_comm,
                syscall=signal.syscall,
                record_time=signal.time,
                serial=signal.serial,
                source=self.source,
            )
            for signal in result.signals
        ]
        self.signals += len(result.signals)
        self.paths[result.path] += 1
        if result.counts:
            self.records += result.records
            spans = result.spans
            counts = {}
            key_spans = {}
            for (pid, arch, nr), count in result.counts.items():
                key = SyscallKey(pid, arch, nr)
                counts[key] = count
                key_spans[key] = spans[(pid, arch, nr)]
            events.append(
                SyscallCounts(
                    start_time=result.start_time,
                    end_time=result.end_time,
                    counts=counts,
                    spans=key_spans,
                    source=self.source,
                )
            )
        for record in result.seccomp:
            events.append(
                SyscallRecord(
                    pid=record.pid,
                    comm=record.comm,
                    exe=record.exe,
                    arch=record.arch,
                    nr=record.nr,
                    action=record.action,
                    serial=record.serial,
                    record_time=record.time,
                    source=self.source,
                )
            )
        if result.garbled:
            events += self.losses({"garbled": result.garbled}, _GARBLED_DETAIL)
            self._count_unreported("garbled_records", result.garbled, result.garbled_example)
        if result.out_of_range:
            events += self.losses({"out_of_range": result.out_of_range}, _OUT_OF_RANGE_DETAIL)
            self._count_unreported("out_of_range_records", result.out_of_range, result.out_of_range_example)
        return events

    def from_long_line(self, line: LongLine) -> list[Event]:
        """Return the RecordLoss of a line that was skipped because it is too long, and count it as garbled."""
        detail = f"a line of {line.size} bytes in {line.path}, longer than {MAX_LINE_LENGTH} bytes, was skipped"
        events = self.losses({"garbled": 1}, detail)
        self._longest_skipped_line = max(self._longest_skipped_line, line.size)
        self._count_unreported("garbled_records", 1, line.example)
        return events

    def losses(self, counts: dict[str, int], detail: str = "") -> list[Event]:
        """Return one RecordLoss per reason with a non-zero count, and log it."""
        events: list[Event] = []
        for reason, count in counts.items():
            if count <= 0:
                continue
            self.lost[reason] += count
            events.append(RecordLoss(source=self.source, reason=reason, count=count, detail=detail))
            if reason != "garbled":
                self.log.error("records_lost", reason=reason, count=count, total=self.lost[reason], detail=detail)
        return events

    def finish(self) -> None:
        """Log the totals, and report lost records to the pipeline result."""
        for event in list(self._unreported):
            self._warn(event, force=True)
        self.log.info(
            "audit_summary",
            records=self.records,
            signals=self.signals,
            lost=dict(self.lost),
            chunks=dict(self.paths),
        )
        if self.lost:
            summary = ", ".join(f"{count} {reason}" for reason, count in sorted(self.lost.items()))
            self.context.report_problem(
                ExitCode.INCOMPLETE, f"audit records were lost or unreadable ({summary}), so the trace is incomplete"
            )

    def _count_unreported(self, event: str, count: int, example: bytes) -> None:
        self._unreported[event] += count
        self._examples[event] = self._examples.get(event) or example
        self._warn(event)

    def _warn(self, event: str, force: bool = False) -> None:
        """Log ``event`` with the lines counted since its last warning, at most once every WARNING_INTERVAL unless ``force``."""
        now = time.monotonic()
        if not self._unreported[event]:
            return
        if not force and now - self._last_warning.get(event, -WARNING_INTERVAL) < WARNING_INTERVAL:
            return
        reason = "garbled" if event == "garbled_records" else "out_of_range"
        fields: dict[str, Any] = {
            "count": self._unreported[event],
            "total": self.lost[reason],
            "example": self._examples.pop(event, b"").decode("utf-8", "replace"),
        }
        if reason == "garbled" and self._longest_skipped_line:
            # Bytes of the longest line skipped as too long since the last warning.
            fields["skipped_line_bytes"] = self._longest_skipped_line
            self._longest_skipped_line = 0
        self.log.warning(event, **fields)
        self._unreported[event] = 0
        self._last_warning[event] = now
