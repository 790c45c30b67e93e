"""Count each container's syscalls in the kernel with a bpftrace program.

The audit sources receive one text record per syscall. This source loads
``speaker/bpf/syscall_counts.bt`` instead, which adds every syscall to a
kernel map keyed by cgroup, syscall number, ABI and time slot, and prints
the maps about once a period. So the cost per syscall is one map update, and
the pipeline receives one SyscallCounts per container and slot.

Counts carry ``container_id`` already, read from the cgroup, and ``pid`` 0
in their keys. ``classify`` only names the syscalls.

The program also prints each signal that a process sends to another task,
and the source emits it at once as a SignalRecord with the kernel time of
the send and the receiver's container, read from /proc. ``classify``
attributes it again by pid, and the phase machine starts the shutdown at the
stop signal's kernel time instead of Docker's later kill event. The counts
of the receiver's container in the slot of the signal carry spans of the
whole slot (see ``SignalSlots``).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import ObjectSendStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

from speaker.bpf import output as bpf
from speaker.bpf.attribution import CountAttribution
from speaker.bpf.cgroups import CgroupError, CgroupNames, choose_hierarchy
from speaker.bpf.program import (
    ALTERNATIVES,
    BpfUnavailable,
    ProgramSettings,
    bpftrace_command,
    bpftrace_environment,
    bpftrace_version,
    build_program,
    check_host,
    ensure_tracefs,
)
from speaker.bpf.signals import SignalSlots, signal_record
from speaker.component import Output, Source
from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import Event, RecordLoss, SignalRecord, SyscallCounts
from speaker.options import Duration, OptionError, option

#: Maximum length of an output line. A printed map of 1M entries is about 40 MiB.
_MAX_LINE = 256 * 2**20
#: Size asked for bpftrace's stdout pipe, so that output written while the
#: pipeline is still setting up does not block bpftrace (1 MiB is Linux's
#: default pipe-max-size).
_PIPE_SIZE = 2**20
_F_SETPIPE_SZ = 1031
#: Seconds to wait for bpftrace to exit after a SIGINT before sending another.
_SIGINT_REPEAT = 3.0
#: stderr lines of bpftrace that are not errors: kernels since 5.11 charge BPF
#: memory to the cgroup, so the RLIMIT_MEMLOCK that it fails to raise does not matter.
_HARMLESS_STDERR = ("couldn't set RLIMIT_MEMLOCK",)
#: The probe of the kernel program that reports signals.
SIGNAL_PROBE = "tracepoint:signal:signal_generate"
_RECURSION_MISSES = re.compile(rb"^recursion_misses:\s+(\d+)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class EbpfOptions:
    resolution: Duration = option(
        Duration.parse("10ms"),
        min=0.001,
        max=1.0,
        help="Length of the time slots that the kernel counts in. Shorter slots place phase boundaries more "
        "precisely and make more map entries.",
    )
    period: Duration = option(
        Duration.parse("500ms"),
        min=0.1,
        max=60.0,
        help="Time each of the three rotating kernel maps collects before it is printed, a multiple of resolution. "
        "Counts reach the pipeline up to 1.5 periods after the syscall, so the phase machine's lag must be longer.",
    )
    map_size: int = option(
        32768,
        min=1024,
        max=2**22,
        help="Maximum entries in each of the three kernel maps: one per cgroup, syscall, ABI and slot within a "
        "period. Updates of a full map fail and are reported as RecordLoss with reason map_full.",
    )
    count_before_seccomp: bool = option(
        True,
        help="Also count syscalls that a task makes before it has a seccomp filter, such as runc's own setup of "
        "the container. False counts what the audit sources see, but then a container without a seccomp "
        "filter (seccomp=unconfined) is not traced at all.",
    )
    cgroup_hierarchy: Literal["auto", "v1", "v2"] = option(
        "auto",
        help='Cgroup hierarchy whose ids key the counts: "v2" (unified), "v1" (a v1 controller such as memory) '
        'or "auto", which takes v2 unless a running container is missing from it.',
    )
    bpftrace: str = option("bpftrace", help="Name or path of the bpftrace executable (tested with 0.17).")
    start_timeout: Duration = option(
        Duration.parse("60s"), min=1.0, help="Maximum time for bpftrace to compile the program and attach its probes."
    )


class Ebpf(Source):
    """Count syscalls per container, syscall, ABI and time slot in the kernel with bpftrace, and report signals."""

    type_name = "ebpf"
    Options = EbpfOptions
    emits = (SyscallCounts, SignalRecord, RecordLoss)
    #: bpftrace prints every map when it gets SIGINT, which takes well under a second.
    drain_timeout = 20.0

    @classmethod
    def check_options(cls, options: EbpfOptions) -> None:
        slot_ns = round(options.resolution * 1e9)
        period_ns = round(options.period * 1e9)
        if period_ns % slot_ns:
            raise OptionError(
                f"the period {options.period} is not a multiple of the resolution {options.resolution}", "period"
            )

    # --- Setup --------------------------------------------------------------

    async def setup(self) -> None:
        options = self.options
        self.process: Process | None = None
        try:
            executable = check_host(options.bpftrace)
            ensure_tracefs()
            hierarchy = choose_hierarchy(options.cgroup_hierarchy)
        except BpfUnavailable as exc:
            raise ComponentError(str(exc)) from None
        except CgroupError as exc:
            raise ComponentError(f"{exc}, {ALTERNATIVES}") from None
        self.settings = ProgramSettings(
            hierarchy=hierarchy,
            slot_ns=round(options.resolution * 1e9),
            period_ns=round(options.period * 1e9),
            count_before_seccomp=options.count_before_seccomp,
        )
        self.names = CgroupNames(hierarchy)
        self.signal_slots = SignalSlots(self.settings.slot_ns)
        self.attribution = CountAttribution(
            self.names, self.settings.slot_ns, self.name, self.log, self.signal_slots
        )
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        #: Syscalls known to be missing, by RecordLoss reason.
        self.losses: collections.Counter[str] = collections.Counter()
        #: Losses not yet sent as RecordLoss events.
        self._pending_losses: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()
        #: Period of the last flush whose clear has not been reported yet.
        self._flush_period: int | None = None
        self._misses_seen = 0

        started = time.monotonic()
        self.process = await anyio.open_process(
            bpftrace_command(executable, build_program(self.settings)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=bpftrace_environment(options.map_size),
        )
        try:
            probes = await self._start_bpftrace()
        except BaseException:
            # The engine calls teardown only after a successful setup.
            with anyio.CancelScope(shield=True):
                await self.teardown()
            raise
        # Scan after attaching: a cgroup that exists now is in the scan, and
        # one made or removed later comes as a cgroup line.
        cgroups = self.names.scan()
        self.log.info(
            "ebpf_started",
            hierarchy=hierarchy.describe(),
            bpftrace=await anyio.to_thread.run_sync(bpftrace_version, executable),
            probes=probes,
            cgroups=cgroups,
            resolution=str(options.resolution),
            period=str(options.period),
            seconds=round(time.monotonic() - started, 2),
        )
        self.log.info(
            "signal_probe_attached",
            probe=SIGNAL_PROBE,
            signals="sent by a process to another task, except SIGURG",
        )

    async def _start_bpftrace(self) -> int:
        """Wait until bpftrace has attached its probes, and return how many."""
        assert self.process is not None and self.process.stdout is not None
        self._enlarge_stdout_pipe(self.process.pid)
        self.stdout = BufferedByteReceiveStream(self.process.stdout)
        timeout = self.options.start_timeout
        with anyio.move_on_after(timeout):
            return await self._wait_attached()
        raise ComponentError(
            f"bpftrace did not attach its probes within {timeout}; raise start_timeout on a slow machine, "
            f"{ALTERNATIVES}"
        )

    def _enlarge_stdout_pipe(self, pid: int) -> None:
        try:
            fd = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            self.log.debug("pipe_size_unchanged", error=str(exc))
            return
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError as exc:
            self.log.debug("pipe_size_unchanged", error=str(exc))
        finally:
            os.close(fd)

    async def _wait_attached(self) -> int:
        while True:
            line = await self._read_line()
            if line is None:
                raise ComponentError(await self._failure_message("bpftrace exited before attaching its probes"))
            try:
                parsed = bpf.parse_line(line)
            except bpf.OutputError:
                continue
            if isinstance(parsed, bpf.Attached):
                return parsed.probes

    async def _read_line(self) -> bytes | None:
        """Return the next stdout line, or None at the end of output."""
        try:
            return await self.stdout.receive_until(b"\n", _MAX_LINE)
        except anyio.IncompleteRead:
            return None
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None

    async def _failure_message(self, summary: str) -> str:
        assert self.process is not None
        with anyio.move_on_after(5):
            await self.process.wait()
        if self.process.stderr is not None:
            with anyio.move_on_after(2):
                async for chunk in self.process.stderr:
                    self._remember_stderr(chunk)
        errors = " | ".join(self.stderr_tail) or "no error output"
        return f"{summary} (exit code {self.process.returncode}): {errors}; {ALTERNATIVES}"

    def _remember_stderr(self, chunk: bytes) -> None:
        for line in chunk.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line and not any(text in line for text in _HARMLESS_STDERR):
                self.stderr_tail.append(line)

    # --- Running ------------------------------------------------------------

    async def run(self, output: Output) -> None:
        process = self.process
        assert process is not None
        send, receive = anyio.create_memory_object_stream[list[Event]](math.inf)
        # The stream is unbounded, so reading bpftrace's stdout never waits for
        # the pipeline. bpftrace clears a map only after it has written the
        # map's print, so a full pipe would delay the clear.
        async with anyio.create_task_group() as group:
            group.start_soon(self._read_stderr)
            group.start_soon(self._read_output, send)
            group.start_soon(self._interrupt_on_stop)
            async with receive:
                async for events in receive:
                    await output.send_many(events)
            group.cancel_scope.cancel()

        with anyio.move_on_after(10):
            await process.wait()
        for reason, count in sorted(self.losses.items()):
            if reason == "late_flush":
                message = f"{self.stats['late_flushes']} map prints came late, so counts may be missing"
            else:
                message = f"{count} syscalls were not counted ({reason})"
            self.context.report_problem(ExitCode.INCOMPLETE, message + "; the profile may lack syscalls")
        self.log.info(
            "ebpf_finished",
            exit_code=process.returncode,
            containers=len(self.attribution.containers),
            counted=self.attribution.stats["counted"],
            host=self.attribution.stats["host"],
            flushes=self.stats["flushes"],
            signals=self.stats["signals"],
            max_map_entries=self.stats["max_map_entries"],
            **{f"lost_{reason}": count for reason, count in self.losses.items()},
        )
        if not self.stopping.is_set():
            # Counts read so far have been sent; without bpftrace no more can come.
            raise ComponentError(await self._failure_message("bpftrace exited before the pipeline stopped"))

    async def _interrupt_on_stop(self) -> None:
        await self.stopping.wait()
        process = self.process
        assert process is not None
        # On SIGINT bpftrace prints every map, then exits: that is the last flush.
        self._check_recursion_misses()
        self.log.info("ebpf_stopping")
        while process.returncode is None:
            process.send_signal(signal.SIGINT)
            with anyio.move_on_after(_SIGINT_REPEAT):
                await process.wait()
            if process.returncode is None:
                # bpftrace 0.17 once missed a SIGINT in testing: it kept
                # waiting for output events, which a program that prints
                # nothing never sends. This program prints every period.
                self.log.warning("bpftrace_still_running", pid=process.pid, action="sending SIGINT again")

    async def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for chunk in self.process.stderr:
            before = len(self.stderr_tail)
            self._remember_stderr(chunk)
            if len(self.stderr_tail) != before:
                self.log.warning("bpftrace_message", message=self.stderr_tail[-1])

    async def _read_output(self, send: ObjectSendStream[list[Event]]) -> None:
        async with send:
            while True:
                line = await self._read_line()
                if line is None:
                    break
                try:
                    parsed = bpf.parse_line(line)
                except bpf.OutputError as exc:
                    self.stats["garbled"] += 1
                    if self.stats["garbled"] == 1:
                        self.log.warning("bpftrace_output_invalid", error=str(exc))
                    continue
                events = self._handle(parsed)
                if events:
                    await send.send(events)
            # Counts of cgroups still unknown at the end are lost.
            events: list[Event] = list(self.attribution.release(final=True))
            self._note_unattributed()
            events.extend(self._loss_events())
            if events:
                await send.send(events)

    def _handle(self, parsed: bpf.Output | None) -> list[Event]:
        if isinstance(parsed, bpf.SignalSent):
            self.stats["signals"] += 1
            container = self.signal_slots.receiver_container(parsed.pid)
            self.signal_slots.add(parsed, container)
            return [signal_record(parsed, self.name, container or "")]
        if isinstance(parsed, bpf.CgroupSeen):
            self.attribution.add_cgroup(parsed)
            return list(self.attribution.release(final=False)) if self.attribution.holding else []
        if isinstance(parsed, bpf.FlushStarted):
            self.stats["flushes"] += 1
            self._flush_period = parsed.period
            self._check_recursion_misses()
            return []
        if isinstance(parsed, bpf.CountsPrinted):
            events = self._counts_events(parsed)
            events.extend(self._loss_events())
            return events
        if isinstance(parsed, bpf.ClearDone):
            self._check_clear_time(parsed)
        elif isinstance(parsed, bpf.HelperFailed):
            reason = "map_full" if parsed.helper == "map_update_elem" else "kernel_lost"
            self._lose(reason, 1)
        elif isinstance(parsed, bpf.EventsLost):
            # A lost output event is a lost failed-update report, a cgroup
            # name, or a print or clear of a map, so counts may be missing.
            self._lose("kernel_lost", parsed.count)
        elif isinstance(parsed, bpf.OtherOutput) and parsed.kind not in ("map", "printf"):
            self.log.debug("bpftrace_output_ignored", kind=parsed.kind)
        return []

    # --- Counts -------------------------------------------------------------

    def _check_clear_time(self, done: bpf.ClearDone) -> None:
        """Report a loss if bpftrace cleared a map after syscalls had started to use it again."""
        period = self._flush_period
        self._flush_period = None
        if period is None:
            return
        boot_offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
        late_ns = clear_late_ns(period, self.settings.period_ns, done.boot_time, boot_offset)
        if late_ns > 0:
            self._lose("late_flush", 0)
            self.stats["late_flushes"] += 1
            self.log.warning(
                "flush_late",
                late_ms=round(late_ns / 1e6, 1),
                consequence="counts of up to one period may be missing; a longer period gives bpftrace more time",
            )

    def _counts_events(self, printed: bpf.CountsPrinted) -> list[Event]:
        self.stats["max_map_entries"] = max(self.stats["max_map_entries"], len(printed.counts))
        if len(printed.counts) > 0.8 * self.options.map_size and not self.stats["map_warned"]:
            self.stats["map_warned"] = 1
            self.log.warning("map_nearly_full", entries=len(printed.counts), map_size=self.options.map_size)

        events: list[Event] = list(self.attribution.events(printed.counts))
        events.extend(self.attribution.release(final=False))
        self._note_unattributed()
        return events

    # --- Losses -------------------------------------------------------------

    def _lose(self, reason: str, count: int) -> None:
        """Record ``count`` syscalls lost for ``reason``; 0 means an unknown number."""
        if reason not in self.losses:
            self.log.warning("counts_lost", reason=reason, count=count)
        self.losses[reason] += count
        self._pending_losses[reason] += count

    def _note_unattributed(self) -> None:
        dropped = self.attribution.stats["unattributed"] - self.losses["unattributed"]
        if dropped > 0:
            self._lose("unattributed", dropped)

    def _loss_events(self) -> list[Event]:
        events: list[Event] = [
            RecordLoss(source=self.name, reason=reason, count=count, detail=_LOSS_DETAILS[reason])
            for reason, count in sorted(self._pending_losses.items())
        ]
        self._pending_losses.clear()
        return events

    def _check_recursion_misses(self) -> None:
        """Count syscalls whose probe the kernel skipped because a BPF program was already running on the CPU.

        Only the sys_enter program's misses are lost syscalls. The signal
        program misses signals that timers raise in interrupts while the
        sys_enter program runs (625 in 3 s of a 0.5 ms itimer on the
        development VM). A signal that a process sends is generated in its
        syscall after the sys_enter program has returned, so it is not among them.
        """
        assert self.process is not None
        fdinfo = Path(f"/proc/{self.process.pid}/fdinfo")
        try:
            entries = sorted((int(entry.name), entry) for entry in fdinfo.iterdir() if entry.name.isdigit())
        except OSError:
            return
        total = 0
        for _, entry in entries:
            try:
                text = entry.read_bytes()
            except OSError:
                continue
            match = _RECURSION_MISSES.search(text)
            if match:
                # TODO: this takes the lowest program fd for sys_enter, which
                # holds for bpftrace 0.17's load order; another order makes the
                # check watch the wrong program.
                total = int(match.group(1))
                break
        if total > self._misses_seen:
            self._lose("kernel_lost", total - self._misses_seen)
            self._misses_seen = total

    # --- Teardown -----------------------------------------------------------

    async def teardown(self) -> None:
        process = getattr(self, "process", None)
        if process is None:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            with anyio.move_on_after(5):
                await process.wait()
        if process.returncode is None:
            self.log.warning("bpftrace_killed", pid=process.pid)
            process.kill()
        await process.aclose()


def clear_late_ns(period: int, period_ns: int, boot_time: float, boot_offset: float) -> int:
    """Return by how many ns bpftrace's clear after the flush in ``period`` was late; 0 or less is in time.

    That flush printed the map of period - 1, which counts again from period
    + 2 on. ``boot_time`` is CLOCK_BOOTTIME from /proc/uptime, cut to 10 ms
    steps, and ``boot_offset`` is CLOCK_BOOTTIME minus CLOCK_MONOTONIC.
    """
    done_ns = round((boot_time + 0.01 - boot_offset) * 1e9)
    return done_ns - (period + 2) * period_ns


_LOSS_DETAILS = {
    "map_full": "kernel map updates failed because the map was full; raise the ebpf source's map_size",
    "kernel_lost": "bpftrace lost output events or the kernel skipped the probe, so counts may be missing",
    "late_flush": "bpftrace cleared a map after it was in use again, so counts of up to one period may be missing",
    "unattributed": "counts of a cgroup whose path could not be read were dropped",
}
