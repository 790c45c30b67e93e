"""Turn parsed audit chunks and known losses into events, for both audit sources."""

from __future__ import annotations

import collections
import time
from typing import Any

from speaker.audit.chunks import ChunkResult
from speaker.engine import ExitCode, PipelineContext
from speaker.events import Event, RecordLoss, SignalRecord, SyscallCounts, SyscallKey, SyscallRecord

#: Seconds between two ``garbled_records`` warnings; lines in between are counted into the next one.
WARNING_INTERVAL = 10.0


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
        self._garbled_unreported = 0
        self._garbled_example = b""
        self._last_warning = -WARNING_INTERVAL

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
            events.extend(self.losses({"garbled": result.garbled}, "lines that are not valid audit records were skipped"))
            self._garbled_unreported += result.garbled
            self._garbled_example = self._garbled_example or result.garbled_example
            self._warn_garbled()
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
        self._warn_garbled(force=True)
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

    def _warn_garbled(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._garbled_unreported or (not force and now - self._last_warning < WARNING_INTERVAL):
            return
        self.log.warning(
            "garbled_records",
            count=self._garbled_unreported,
            total=self.lost["garbled"],
            example=self._garbled_example.decode("utf-8", "replace"),
        )
        self._garbled_unreported = 0
        self._garbled_example = b""
        self._last_warning = now
