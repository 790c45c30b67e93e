"""Read SECCOMP audit records from auditd's log file."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Literal

import anyio

from speaker.audit.chunks import ChunkParser
from speaker.audit.counting import AuditEvents
from speaker.audit.follow import AuditLogFollower, Chunk, NotRegularFileError, Switch
from speaker.audit.kernel import KERNEL_LOST_DETAIL, SERIAL_GAP_DETAIL, KernelAudit
from speaker.audit.marker import DrainMarker
from speaker.audit.serials import SerialTracker
from speaker.audit.source_options import AuditSourceOptions
from speaker.component import Output, Source
from speaker.errors import ComponentError
from speaker.events import Event, RecordLoss, SignalRecord, SyscallCounts, SyscallRecord
from speaker.options import ByteSize, Duration, option


@dataclasses.dataclass(frozen=True)
class AuditLogOptions(AuditSourceOptions):
    path: Path = option(Path("/var/log/audit/audit.log"), help="auditd's log file (log_file in auditd.conf).")
    start: Literal["end", "beginning"] = option(
        "end",
        help='Where to start reading: "end" traces from now on, "beginning" also reads what the file already contains '
        "(for replaying a captured log).",
    )
    stop_at_end: bool = option(
        False, help="Stop at the end of the file instead of waiting for more, for replaying a captured log."
    )
    read_size: ByteSize = option(
        ByteSize.parse("1MiB"),
        min=4096,
        max=ByteSize.parse("64MiB"),
        help="Bytes read and parsed at once when the log has a backlog.",
    )
    flush_interval: Duration = option(
        Duration.parse("100ms"),
        min=0.01,
        max=0.1,
        help="Time between two checks for new lines at the end of the file, so records read reach the pipeline "
        "at least this often (the same option as audit_netlink's).",
    )
    drain_timeout: Duration = option(
        Duration.parse("5s"),
        help="Maximum time to keep reading after a stop request, until a marker record made at the stop appears "
        "in the log (or, where no marker can be made, until two polls find nothing new).",
    )


class AuditLog(Source):
    """Count SECCOMP audit records from auditd's log file, following its rotation."""

    type_name = "audit_log"
    Options = AuditLogOptions
    emits = (SyscallCounts, SyscallRecord, SignalRecord, RecordLoss)

    async def setup(self) -> None:
        options = self.options
        self.drain_timeout = float(options.drain_timeout)
        self.tracker = SerialTracker(grace=float(options.gap_grace))
        self.parser = ChunkParser(self.tracker, keep_records=options.records)
        self.events = AuditEvents(self.name, self.log, self.context)
        self.replay = options.stop_at_end
        self.marker = DrainMarker()
        self.kernel = KernelAudit(
            options.adjust_kernel and not self.replay,
            options.backlog_limit,
            self.log,
            signal_rule=options.stop_signals and not self.replay,
        )
        self.follower = AuditLogFollower(
            options.path, from_start=options.start == "beginning", read_size=int(options.read_size)
        )

        try:
            await self.follower.open()
        except FileNotFoundError:
            raise ComponentError(
                f"{options.path} does not exist. Start auditd, or set path to the log_file of its auditd.conf"
            ) from None
        except PermissionError:
            raise ComponentError(
                f"cannot read {options.path}: permission denied. Run SPEAKER as root, or add its user to the "
                "log_group of auditd.conf, or use the audit_netlink source, which needs no auditd"
            ) from None
        except NotRegularFileError:
            raise ComponentError(
                f"{options.path}: not a regular file; set path to auditd's log file, such as /var/log/audit/audit.log"
            ) from None
        except OSError as exc:
            raise ComponentError(f"cannot open {options.path}: {exc.strerror}") from exc

        try:
            if not self.replay:
                await self.kernel.start()
                self._check_auditd()
        except BaseException:
            # Teardown runs only after a finished setup, so undo the kernel changes here.
            with anyio.CancelScope(shield=True):
                await self.follower.close()
                await self.kernel.stop()
            raise
        self.log.info("audit_log_opened", path=str(options.path), start=options.start, lost=self.kernel.lost)

    def _check_auditd(self) -> None:
        status = self.kernel.status
        if status is not None:
            running = status.pid != 0
        else:
            running = any(_process_name(pid) == "auditd" for pid in os.listdir("/proc") if pid.isdigit())
        if not running:
            raise ComponentError(
                f"auditd is not running, so nothing new reaches {self.options.path}. Start it "
                "(service auditd start), or use the audit_netlink source, which reads the kernel directly"
            )

    async def run(self, output: Output) -> None:
        poll = float(self.options.flush_interval)
        interval = float(self.options.lost_check_interval)
        next_lost_check = time.monotonic() + interval
        empty_polls = 0
        draining = marker_sent = False
        try:
            while True:
                if self.stopping.is_set() and not draining and not self.replay:
                    draining = True
                    marker_sent = await anyio.to_thread.run_sync(self.marker.emit)
                    if not marker_sent:
                        self.log.info("drain_without_marker", reason=self.marker.error)
                item = await self.follower.read()
                events: list[Event] = []
                markers = 0
                if isinstance(item, Chunk):
                    # Parsed on the event loop's thread: a hop to a worker thread per
                    # chunk made the source about a third slower on a 2-core host.
                    for long_line in item.long_lines:
                        events += self.events.from_long_line(long_line)
                    if item.end:
                        result = self.parser.parse(item.buffer, item.end)
                        markers = self.marker.take(result)
                        events += self.events.from_chunk(result)
                elif isinstance(item, Switch):
                    events += self._switched(item)
                events += self.events.losses(self.tracker.confirm(), SERIAL_GAP_DETAIL)
                if time.monotonic() >= next_lost_check:
                    next_lost_check = time.monotonic() + interval
                    events += self.events.losses({"kernel_lost": await self.kernel.lost_increase()}, KERNEL_LOST_DETAIL)
                await output.send_many(events)
                if draining and markers:
                    break
                if item is not None:
                    empty_polls = 0
                    continue
                # The end of the file: wait for more, unless replaying. Without a
                # marker, a drain ends once two polls in a row found nothing new.
                empty_polls += 1
                if self.replay or (draining and not marker_sent and empty_polls > 2):
                    break
                if self.stopping.is_set():
                    await anyio.sleep(poll)
                else:
                    with anyio.move_on_after(poll):
                        await self.stopping.wait()
        finally:
            with anyio.CancelScope(shield=True):
                events = []
                long_line = self.follower.take_long_line()
                if long_line is not None:
                    events += self.events.from_long_line(long_line)
                leftover = self.follower.leftover()
                if leftover:
                    # A line without its newline at the end: a record cut short.
                    events += self.events.from_chunk(self.parser.parse(leftover + b"\n"))
                events += self.events.losses(self.tracker.confirm(final=True), SERIAL_GAP_DETAIL)
                events += self.events.losses({"kernel_lost": await self.kernel.lost_increase()}, KERNEL_LOST_DETAIL)
                with anyio.move_on_after(1.0):
                    await output.send_many(events)
                self.events.finish()

    def _switched(self, switch: Switch) -> list[Event]:
        self.log.info(
            "audit_log_rotated",
            previous=str(switch.previous),
            current=str(switch.current),
            rotated_away=switch.rotated_away,
        )
        events: list[Event] = []
        if switch.long_line is not None:
            events += self.events.from_long_line(switch.long_line)
        if switch.partial_line:
            result = self.parser.parse(switch.partial_line + b"\n")
            events += self.events.from_chunk(result)
        if switch.rotated_away:
            # The next serial gap is the records of the deleted files.
            self.tracker.expect_gap("rotated_away")
        return events

    async def teardown(self) -> None:
        await self.follower.close()
        await self.kernel.stop()


def _process_name(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
