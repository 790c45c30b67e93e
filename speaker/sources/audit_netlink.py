"""Read SECCOMP audit records from the kernel's audit multicast group."""

from __future__ import annotations

import dataclasses
import time

import anyio

from speaker.audit.chunks import ChunkParser
from speaker.audit.counting import AuditEvents
from speaker.audit.kernel import KERNEL_LOST_DETAIL, SERIAL_GAP_DETAIL, KernelAudit
from speaker.audit.marker import DrainMarker
from speaker.audit.netlink import open_multicast, receive_buffer_size
from speaker.audit.reader import MulticastReader
from speaker.audit.serials import SerialTracker
from speaker.audit.source_options import AuditSourceOptions
from speaker.component import Output, Source
from speaker.errors import ComponentError
from speaker.events import Event, RecordLoss, SignalRecord, SyscallCounts, SyscallRecord
from speaker.options import ByteSize, Duration, option

#: Bytes of records parsed at once; larger pieces fit the CPU caches worse.
_PARSE_PIECE = 1 << 20


@dataclasses.dataclass(frozen=True)
class AuditNetlinkOptions(AuditSourceOptions):
    receive_buffer: ByteSize = option(
        ByteSize.parse("64MiB"),
        help="Receive buffer of the audit socket, set with SO_RCVBUFFORCE (or SO_RCVBUF, capped at "
        "net.core.rmem_max, without CAP_NET_ADMIN); 0 keeps net.core.rmem_default. It absorbs bursts while the "
        "pipeline is busy.",
    )
    max_pending: ByteSize = option(
        ByteSize.parse("256MiB"),
        help="Maximum bytes of records read but not yet parsed. When full, reading pauses and the socket "
        "buffer fills, so any loss shows up as ENOBUFS.",
    )
    flush_interval: Duration = option(
        Duration.parse("100ms"),
        min=0.01,
        max=0.1,
        help="Time between two SyscallCounts events, which count the records read in between.",
    )
    drain_timeout: Duration = option(
        Duration.parse("5s"),
        help="Maximum time to keep reading after a stop request, until a marker record made at the stop arrives "
        "(or, where no marker can be made, until the socket has been empty for 100 ms).",
    )


class AuditNetlink(Source):
    """Count SECCOMP audit records from the audit multicast socket (needs CAP_AUDIT_READ, not auditd)."""

    type_name = "audit_netlink"
    Options = AuditNetlinkOptions
    emits = (SyscallCounts, SyscallRecord, SignalRecord, RecordLoss)

    async def setup(self) -> None:
        options = self.options
        self.drain_timeout = float(options.drain_timeout)
        self.tracker = SerialTracker(grace=float(options.gap_grace))
        self.parser = ChunkParser(self.tracker, keep_records=options.records)
        self.events = AuditEvents(self.name, self.log, self.context)
        self.kernel = KernelAudit(options.adjust_kernel, options.backlog_limit, self.log, signal_rule=options.stop_signals)
        self.marker = DrainMarker()

        # TODO: outside the host's network namespace the socket receives no records,
        # and nothing detects it, so such a trace looks empty instead of failing.
        try:
            self.sock = open_multicast(int(options.receive_buffer))
        except PermissionError:
            raise ComponentError(
                "cannot join the audit multicast group: the process lacks CAP_AUDIT_READ. Run SPEAKER as root "
                "(or grant CAP_AUDIT_READ), or read auditd's log instead with the audit_log source "
                "(--set sources.audit.type=audit_log)"
            ) from None
        except OSError as exc:
            raise ComponentError(f"cannot open the audit netlink socket: {exc.strerror}") from exc
        self.reader = MulticastReader(self.sock, int(options.max_pending))

        try:
            await self.kernel.start()
        except BaseException:
            self.sock.close()
            raise

        status = self.kernel.status
        self.log.info(
            "audit_socket_ready",
            receive_buffer=receive_buffer_size(self.sock),
            backlog_limit=None if status is None else max(status.backlog_limit, options.backlog_limit),
            lost=self.kernel.lost,
        )

    async def run(self, output: Output) -> None:
        self.reader.start()
        next_lost_check = time.monotonic() + float(self.options.lost_check_interval)
        draining = False
        try:
            while True:
                with anyio.move_on_after(float(self.options.flush_interval)):
                    await self.stopping.wait()
                if self.stopping.is_set() and not draining:
                    draining = True
                    await self._start_drain()
                running = self.reader.running
                events, markers = await self._take_batch()
                if time.monotonic() >= next_lost_check:
                    next_lost_check = time.monotonic() + float(self.options.lost_check_interval)
                    events += await self._check_kernel_lost()
                await output.send_many(events)
                if self.reader.error is not None:
                    raise ComponentError(f"reading the audit socket failed: {self.reader.error}")
                if (draining and markers) or not running:
                    break
        finally:
            with anyio.CancelScope(shield=True):
                self.reader.abort()
                events, _ = await self._take_batch()
                events += self.events.losses(self.tracker.confirm(final=True), SERIAL_GAP_DETAIL)
                events += await self._check_kernel_lost()
                with anyio.move_on_after(1.0):
                    await output.send_many(events)
                self.events.finish()

    async def _start_drain(self) -> None:
        """Make a marker record, which arrives after every record made before the stop request."""
        if not await anyio.to_thread.run_sync(self.marker.emit):
            self.log.info("drain_without_marker", reason=self.marker.error)
            self.reader.drain()

    async def _take_batch(self) -> tuple[list[Event], int]:
        """Parse what the reader has read; return the events and the number of marker records among them."""
        data, overflows = self.reader.take()
        events: list[Event] = []
        markers = 0
        # Parsed on the event loop's thread, in pieces with a checkpoint in
        # between: a hop to a worker thread per batch made parsing about a
        # third slower on a 2-core host, and a backlog can be hundreds of MiB.
        start = 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + _PARSE_PIECE) + 1
            if end <= start:
                end = data.index(b"\n", start + _PARSE_PIECE) + 1  # one line longer than a piece
            result = self.parser.parse(data if start == 0 and end == len(data) else data[start:end])
            markers += self.marker.take(result)
            events += self.events.from_chunk(result)
            start = end
            if start < len(data):
                await anyio.lowlevel.checkpoint()
        if overflows:
            events += self.events.losses(
                {"enobufs": overflows},
                "the socket's receive buffer overflowed this many times; the serial_gap losses give the number "
                "of records dropped. Raise receive_buffer",
            )
        events += self.events.losses(self.tracker.confirm(), SERIAL_GAP_DETAIL)
        return events, markers

    async def _check_kernel_lost(self) -> list[Event]:
        return self.events.losses({"kernel_lost": await self.kernel.lost_increase()}, KERNEL_LOST_DETAIL)

    async def teardown(self) -> None:
        self.reader.abort()
        self.sock.close()
        await self.kernel.stop()
