"""Name syscalls and attribute them to traced containers."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import threading
import time
from typing import Any, Literal

import anyio

from speaker.component import Output, Stage
from speaker.container_cgroups import DEFAULT_PATTERN, CgroupResolver
from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    ContainerOutput,
    Event,
    ProcessSample,
    RecordLoss,
    SignalRecord,
    SyscallCounts,
    SyscallKey,
    SyscallRecord,
)
from speaker.options import Duration, OptionError, option
from speaker.pid_table import SLACK, PidTable
from speaker.proc_connector import ProcConnector, ProcConnectorError, ProcEvent, ProcEventThread
from speaker.syscalls import is_unknown, syscall_name

#: Container id used in pending entries for records whose process could not be found.
_UNATTRIBUTED = None


@dataclasses.dataclass(frozen=True)
class ClassifyOptions:
    cgroup_pattern: str = option(
        DEFAULT_PATTERN,
        help="Regular expression with one group that captures the container id in a /proc/PID/cgroup line.",
    )
    hold: Duration = option(
        Duration.parse("2s"),
        help="Time a syscall event waits for the Docker event of its container, or for a traced container "
        "it could belong to, before it is dropped as untraced.",
    )
    per_pid: bool = option(
        False, help="Keep each pid's counts apart in the emitted SyscallCounts instead of summing them per container."
    )
    proc_connector: Literal["auto", "on", "off"] = option(
        "auto",
        help='Follow forks through the kernel proc connector: "on" fails without it, "auto" falls back to '
        "/proc reads only (short-lived processes may then stay unattributed).",
    )
    retention: Duration = option(
        Duration.parse("1m"), help="Time the pid table remembers a process after its exit, for late records."
    )


@dataclasses.dataclass
class TracedContainer:
    """A container that a ContainerEvent named, so its syscalls are kept."""

    #: Wall-clock time of its first event.
    first_seen: float
    #: Wall-clock time of its die event, inf while it runs.
    ended: float = math.inf


@dataclasses.dataclass
class Pending:
    """Syscalls held until their container is known to be traced, or until ``hold`` passes."""

    arrived: float
    start_time: float
    end_time: float
    counts: dict[SyscallKey, int]
    template: Event
    #: First and last record time per key, when the source tracks them.
    spans: dict[SyscallKey, tuple[float, float]] = dataclasses.field(default_factory=dict)


class Classify(Stage):
    """Name each syscall with libseccomp and attribute it to its container by the process's cgroup.

    Counts of traced containers (those that a ContainerEvent named) are
    emitted per container. Counts of other containers and of host processes
    are dropped and counted. Counts from processes that exited before they
    could be attributed become a RecordLoss with reason ``unattributed`` when
    a traced container was running at the time. A SignalRecord goes to the
    container of the process that received the signal, and is dropped when
    that container is not traced. Other events pass through.
    """

    type_name = "classify"
    Options = ClassifyOptions
    accepts = (SyscallCounts, SyscallRecord, SignalRecord, RecordLoss, ContainerEvent, ContainerOutput, ProcessSample)
    emits = (SyscallCounts, SyscallRecord, SignalRecord, RecordLoss, ContainerEvent, ContainerOutput, ProcessSample)
    tick_interval = 0.25

    @classmethod
    def check_options(cls, options: ClassifyOptions) -> None:
        try:
            CgroupResolver(options.cgroup_pattern)
        except (ValueError, re.error) as exc:
            raise OptionError(f"invalid cgroup_pattern: {exc}", "cgroup_pattern") from None

    async def setup(self) -> None:
        options = self.options
        self.pids = PidTable(CgroupResolver(options.cgroup_pattern))
        self.connector: ProcConnector | None = None
        if options.proc_connector != "off":
            try:
                self.connector = ProcConnector()
            except ProcConnectorError as exc:
                if options.proc_connector == "on":
                    raise ComponentError(f"{exc.strerror}; run as root, or set proc_connector = \"auto\"") from None
                self.log.warning(
                    "proc_connector_unavailable",
                    error=exc.strerror,
                    consequence="records of processes that exit within about 100 ms may be reported as lost",
                )
        if self.connector is not None:
            self.pids.revalidate_after = math.inf
        self.traced: dict[str, TracedContainer] = {}
        self.pending: dict[str | None, list[Pending]] = collections.defaultdict(list)
        self.names: dict[tuple[str, int], str] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.untraced_ids: set[str] = set()
        self._overflows_seen = 0
        #: Guards ``pids``, which the proc connector's thread also updates.
        self.lock = threading.Lock()

    async def teardown(self) -> None:
        if self.connector is not None:
            self.connector.close()

    # --- Running ------------------------------------------------------------

    async def run(self, input: Any, output: Output) -> None:
        thread = None
        if self.connector is not None:
            thread = ProcEventThread(self.connector, self._apply_proc_events, self.log)
            thread.start()
        try:
            await super().run(input, output)
        finally:
            if thread is not None:
                await anyio.to_thread.run_sync(thread.stop)

    def _apply_proc_events(self, events: list[ProcEvent]) -> None:
        """Update the pid table from process events; runs on the proc connector's thread."""
        assert self.connector is not None
        with self.lock:
            pids = self.pids
            for event in events:
                if event.kind == "fork":
                    pids.forked(event.pid, event.parent, event.time)
                elif event.kind == "exec":
                    pids.execed(event.pid, event.time)
                else:
                    pids.exited(event.pid, event.time)
            overflows = self.connector.overflows
            if overflows != self._overflows_seen:
                # Forks were missed, so any remembered pid may have been reused.
                pids.trusted_since = time.monotonic()
        if overflows != self._overflows_seen:
            self.log.warning(
                "proc_connector_overflow",
                overflows=overflows - self._overflows_seen,
                consequence="pids are checked against /proc again",
            )
            self._overflows_seen = overflows

    async def process(self, event: Event, output: Output) -> None:
        if isinstance(event, SyscallCounts):
            await self._classify_counts(event, output)
        elif isinstance(event, SyscallRecord):
            await self._classify_record(event, output)
        elif isinstance(event, SignalRecord):
            await self._classify_signal(event, output)
        elif isinstance(event, ContainerEvent):
            await self._container_event(event, output)
            await output.send(event)
        elif isinstance(event, (ProcessSample, ContainerOutput)) and event.container_id not in self.traced:
            # proc_sampler samples every container on the host.
            self.stats["untraced_samples"] += 1
        else:
            if isinstance(event, ProcessSample):
                with self.lock:
                    for task in event.tasks:
                        self.pids.seen(task.pid, event.container_id, event.wall_time)
            await output.send(event)

    async def _container_event(self, event: ContainerEvent, output: Output) -> None:
        container_id = event.container_id
        when = event.event_time or event.wall_time
        traced = self.traced.get(container_id)
        if traced is None:
            traced = self.traced[container_id] = TracedContainer(first_seen=when)
            self.log.info("container_traced", container=container_id[:12], name=event.name)
        if event.pid:
            with self.lock:
                self.pids.seen(event.pid, container_id, when)
        if event.action == ContainerAction.DIE:
            traced.ended = when
        waiting = self.pending.pop(container_id, None)
        if waiting:
            for item in waiting:
                await output.send(self._counts_event(item.template, container_id, item))

    # --- Attribution --------------------------------------------------------

    def _name(self, arch: str, nr: int) -> str:
        name = syscall_name(arch, nr)
        self.names[(arch, nr)] = name
        if is_unknown(name):
            self.log.warning("unknown_syscall", arch=arch, nr=nr, syscall=name)
        return name

    async def _classify_counts(self, event: SyscallCounts, output: Output) -> None:
        start, end = event.start_time, event.end_time
        names = self.names
        per_pid = self.options.per_pid
        container_at = self.pids.container_at
        containers: dict[int, str | None] = {}
        with self.lock:
            for pid in {key.pid for key in event.counts}:
                if pid == 0 and event.container_id:
                    # Counts that the source attributed itself, by cgroup (the ebpf source).
                    containers[pid] = event.container_id
                else:
                    containers[pid] = container_at(pid, start, end)
        spans = event.spans
        grouped: dict[str | None, dict[SyscallKey, int]] = {}
        grouped_spans: dict[str | None, dict[SyscallKey, tuple[float, float]]] = {}
        for key, count in event.counts.items():
            pid = key.pid
            container = containers[pid]
            name = names.get((key.arch, key.nr)) or self._name(key.arch, key.nr)
            # Unattributed counts keep their pid for the debug log.
            new_key = SyscallKey(pid if per_pid or container is None else 0, key.arch, key.nr, name)
            counts = grouped.get(container)
            if counts is None:
                counts = grouped[container] = {}
                grouped_spans[container] = {}
            counts[new_key] = counts.get(new_key, 0) + count
            span = spans.get(key)
            if span is not None:
                merge_span(grouped_spans[container], new_key, span)
        for container, counts in grouped.items():
            await self._route(event, container, start, end, counts, output, grouped_spans[container])

    async def _classify_record(self, event: SyscallRecord, output: Output) -> None:
        when = event.record_time
        with self.lock:
            container = self.pids.container_at(event.pid, when, when)
        name = self.names.get((event.arch, event.nr)) or self._name(event.arch, event.nr)
        key = SyscallKey(event.pid, event.arch, event.nr, name)
        await self._route(event, container, when, when, {key: 1}, output)

    async def _route(
        self,
        template: Event,
        container: str | None,
        start: float,
        end: float,
        counts: dict[SyscallKey, int],
        output: Output,
        spans: dict[SyscallKey, tuple[float, float]] | None = None,
    ) -> None:
        if container == "":
            self.stats["host"] += sum(counts.values())
            return
        item = Pending(time.monotonic(), start, end, counts, template, spans or {})
        if container is not None and container in self.traced:
            await output.send(self._counts_event(template, container, item))
            return
        self.pending[container].append(item)

    def _counts_event(self, template: Event, container: str, item: Pending) -> Event:
        self.stats["attributed"] += sum(item.counts.values())
        if isinstance(template, SyscallRecord):
            (key,) = item.counts
            return dataclasses.replace(template, container_id=container, name=key.name)
        assert isinstance(template, SyscallCounts)
        return dataclasses.replace(template, container_id=container, counts=item.counts, spans=item.spans)

    async def _classify_signal(self, event: SignalRecord, output: Output) -> None:
        """Send a signal on as an event of the receiver's container, when that container is traced."""
        when = event.record_time
        with self.lock:
            receiver = self.pids.container_at(event.pid, when, when)
            sender = self.pids.container_at(event.sender_pid, when, when) if event.sender_pid else None
        if not receiver or receiver not in self.traced:
            self.stats["signals_untraced"] += 1
            return
        self.stats["signals"] += 1
        await output.send(dataclasses.replace(event, container_id=receiver, from_container=sender == receiver))

    # --- Expiry -------------------------------------------------------------

    async def tick(self, now: float, output: Output) -> None:
        await self._expire(time.monotonic() - self.options.hold, output)
        with self.lock:
            self.pids.prune(time.time() - self.options.retention)

    async def finish(self, output: Output) -> None:
        await self._expire(math.inf, output)
        if self.stats["unattributed"]:
            self.context.report_problem(
                ExitCode.INCOMPLETE,
                f"{self.stats['unattributed']} syscalls came from processes that exited before their cgroup "
                "could be read, while a traced container ran; the profile may lack syscalls",
            )
        self.log.info(
            "classify_summary",
            attributed=self.stats["attributed"],
            host=self.stats["host"],
            untraced=self.stats["untraced"],
            untraced_containers=sorted(container[:12] for container in self.untraced_ids)[:10],
            unattributed=self.stats["unattributed"],
            unattributed_dropped=self.stats["unattributed_dropped"],
            proc_reads=self.pids.proc_reads,
            traced_containers=len(self.traced),
            signals=self.stats["signals"],
            signals_untraced=self.stats["signals_untraced"],
        )

    async def _expire(self, arrived_before: float, output: Output) -> None:
        for container in list(self.pending):
            items = self.pending[container]
            expired = [item for item in items if item.arrived <= arrived_before]
            if not expired:
                continue
            kept = [item for item in items if item.arrived > arrived_before]
            if kept:
                self.pending[container] = kept
            else:
                del self.pending[container]
            if container is _UNATTRIBUTED:
                await self._report_unattributed(await self._retry(expired, output), output)
            else:
                for item in expired:
                    self._drop_untraced(container, item.counts)

    def _drop_untraced(self, container: str, counts: dict[SyscallKey, int]) -> None:
        self.stats["untraced"] += sum(counts.values())
        if container not in self.untraced_ids:
            self.untraced_ids.add(container)
            self.log.debug("untraced_container_dropped", container=container[:12])

    async def _retry(self, items: list[Pending], output: Output) -> list[Pending]:
        """Attribute held counts again with what the pid table has learned since; return what is still unknown.

        Events that name pids (a container's init pid, process samples) can
        arrive after the records of those pids.
        """
        unresolved = []
        per_pid = self.options.per_pid
        for item in items:
            by_pid: dict[int, dict[SyscallKey, int]] = collections.defaultdict(dict)
            for key, count in item.counts.items():
                by_pid[key.pid][key] = count
            with self.lock:
                containers = {pid: self.pids.container_at(pid, item.start_time, item.end_time) for pid in by_pid}
            left: dict[SyscallKey, int] = {}
            for pid, counts in by_pid.items():
                container = containers[pid]
                if container is None:
                    left.update(counts)
                elif container == "":
                    self.stats["host"] += sum(counts.values())
                elif container in self.traced:
                    spans: dict[SyscallKey, tuple[float, float]] = {}
                    if not per_pid:
                        for key in counts:
                            if key in item.spans:
                                merge_span(spans, key._replace(pid=0), item.spans[key])
                        counts = {key._replace(pid=0): count for key, count in counts.items()}
                    else:
                        spans = {key: item.spans[key] for key in counts if key in item.spans}
                    settled = Pending(item.arrived, item.start_time, item.end_time, counts, item.template, spans)
                    await output.send(self._counts_event(item.template, container, settled))
                else:
                    self._drop_untraced(container, counts)
            if left:
                left_spans = {key: item.spans[key] for key in left if key in item.spans}
                unresolved.append(Pending(item.arrived, item.start_time, item.end_time, left, item.template, left_spans))
        return unresolved

    async def _report_unattributed(self, items: list[Pending], output: Output) -> None:
        """Turn records of vanished processes into a RecordLoss when a traced container could have made them."""
        if not items:
            return
        lost = 0
        candidates: set[str] = set()
        for item in items:
            running = self._running_between(item.start_time, item.end_time)
            total = sum(item.counts.values())
            if running:
                lost += total
                candidates.update(running)
            else:
                self.stats["unattributed_dropped"] += total
        if not lost:
            return

        self.stats["unattributed"] += lost
        container = next(iter(candidates)) if len(candidates) == 1 else ""
        detail = (
            f"{lost} syscalls came from processes that exited before their cgroup could be read, "
            f"while {len(candidates)} traced container(s) ran"
        )
        self.log.error("records_unattributed", count=lost, containers=sorted(c[:12] for c in candidates))
        pids = sorted({key.pid for item in items for key in item.counts})
        with self.lock:
            described = {pid: self.pids.describe(pid) for pid in pids[:20]}
        self.log.debug("unattributed_pids", pids=described, more=max(0, len(pids) - 20))
        await output.send(
            RecordLoss(container_id=container, source=self.name, reason="unattributed", count=lost, detail=detail)
        )

    def _running_between(self, start: float, end: float) -> list[str]:
        hold = float(self.options.hold)
        return [
            container
            for container, traced in self.traced.items()
            if traced.first_seen - hold <= end + SLACK and start - SLACK <= traced.ended
        ]


def merge_span(spans: dict[SyscallKey, tuple[float, float]], key: SyscallKey, span: tuple[float, float]) -> None:
    """Widen the span of ``key`` in ``spans`` to cover ``span`` as well."""
    known = spans.get(key)
    spans[key] = span if known is None else (min(known[0], span[0]), max(known[1], span[1]))
