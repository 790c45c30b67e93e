"""Enforce each container's phase lists with the back end that the ``backend`` option selects."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Literal

from speaker.component import Batch, Input, Output, Stage
from speaker.engine import ExitCode
from speaker.enforce_exits import ExitWatch
from speaker.enforce_profile import compile_settings
from speaker.events import CompiledFilter, ContainerEvent, ContainerOutput, Event, PhaseChange, SyscallRecord, Violation
from speaker.kmod_backend import DENY_ACTIONS, KmodBackend, KmodSettings
from speaker.kmod_driver import KmodOptions
from speaker.notify.supervisor import NotifySupervisor, SupervisorOptions, check_supervisor_options
from speaker.options import OptionError, option, option_specs

#: Reasons, by option name, that the notify-only options have no meaning with the kmod back end.
NOTIFY_ONLY = {
    "mode": "the kmod back end has no complain mode: the kernel applies each phase's program and reports nothing, "
    "so run the notify back end in complain mode, or trace again",
    "exact": "the kmod back end always enforces each phase's own list, and exact only selects the notify-exact layout",
    "shutdown_grace": "with kmod, kernel_shutdown switches to shutdown in the kernel when the stop signal is sent, "
    "so no syscall waits for Docker's kill event",
    "running_grace": "only the notify-exact layout holds syscalls until the switch to running",
    "socket": "the kmod back end runs no supervisor, so no runtime connects to a socket",
    "response_timeout": "the kmod back end runs no supervisor, so no notification waits for one",
    "max_listeners": "the kmod back end receives no listener fds",
    "receive": "the kmod back end receives no notifications",
}


@dataclasses.dataclass(frozen=True)
class BackendOption:
    backend: Literal["notify", "kmod"] = option(
        "notify",
        help='Enforcement back end. "notify": seccomp user notification and the SPEAKER supervisor, no kernel '
        'module needed, reports violations (docs/enforcement.md). "kmod": the SPEAKER kernel module swaps one '
        "program per phase in the kernel; needs `profile`, has no complain mode and reports nothing (docs/kmod.md).",
    )


@dataclasses.dataclass(frozen=True)
class EnforceOptions(KmodOptions, SupervisorOptions, BackendOption):
    """The options of both back ends. A dataclass lists the fields of its last base first, so ``backend`` leads."""


#: Options, by component type, that report a container's early exit as an incomplete trace.
TRACING_REPORTS = {"docker_events": ("report_exit",), "phase_machine": ("report_not_ready",)}

#: Options of the kmod back end alone, from KmodOptions.
KMOD_ONLY = tuple(spec.name for spec in option_specs(KmodOptions))


class Enforce(Stage):
    """Enforce each container's booting, running and shutdown lists, through seccomp notification or the kernel module.

    ``backend = "notify"`` works as the ``supervisor`` stage and emits a
    Violation for each denial. ``backend = "kmod"`` compiles the profile's
    phase programs, registers each container's init process with the kernel
    module on its start event, and switches programs on each PhaseChange, as
    the ``kmod`` sink does. ``check_options`` rejects an option that the
    chosen back end would ignore.

    A container that crashes, or that the kernel kills with SIGSYS, under
    enforcement makes the pipeline fail (exit code 1) with one message that
    names its exit code, its phase and its violations (speaker.enforce_exits).
    ContainerOutput lines only feed the last output of that message.

    SyscallRecords, which an audit source and ``classify`` upstream deliver
    (pipelines/enforce-audited.toml), report the processes that the kernel
    killed: each kill in an enforced container becomes a Violation with
    action ``killed``, with either back end. Other records are dropped.
    """

    type_name = "enforce"
    Options = EnforceOptions
    accepts = (PhaseChange, ContainerEvent, CompiledFilter, ContainerOutput, SyscallRecord)
    emits = (Violation,)

    @classmethod
    def check_options(cls, options: EnforceOptions) -> None:
        check_supervisor_options(options)
        defaults = {spec.name: spec.default for spec in option_specs(EnforceOptions)}
        if options.backend == "kmod":
            if not options.profile:
                raise OptionError(
                    'backend "kmod" needs `profile`: the stage compiles the phase programs from it. To load '
                    "filter_compile's programs instead, use the kmod sink",
                    "profile",
                )
            for name, reason in NOTIFY_ONLY.items():
                if getattr(options, name) != defaults[name]:
                    raise OptionError(f'{name} applies to backend "notify" only: {reason}', name)
        else:
            for name in KMOD_ONLY:
                if getattr(options, name) != defaults[name]:
                    raise OptionError(f'{name} applies to backend "kmod" only; set backend = "kmod" to use it', name)

    async def setup(self) -> None:
        options = self.options
        self._backend: NotifySupervisor | KmodBackend
        if options.backend == "kmod":
            self._backend = KmodBackend(self.name, kmod_settings(options), options, self.log, self.context)
        else:
            self._backend = NotifySupervisor(self.name, options, self.log)
        self.log.info("enforce_backend", backend=options.backend)
        self._check_upstream_reports()
        await self._backend.setup()

    def _check_upstream_reports(self) -> None:
        """Log each upstream component that would also report a failed container as an incomplete trace."""
        spec = self.context.spec
        pending, seen = list(spec.components[self.name].inputs), set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            upstream = spec.components[name]
            pending.extend(upstream.inputs)
            for option in TRACING_REPORTS.get(upstream.type_name, ()):
                if getattr(upstream.options, option):
                    self.log.warning(
                        "tracing_report_on",
                        upstream=name,
                        option=option,
                        fix=f"set {upstream.section}.{name}.{option} = false, so that a container that fails "
                        "under enforcement is not also reported as an incomplete trace (exit code 3)",
                    )

    async def run(self, input: Input, output: Output) -> None:
        watch = ExitWatch(self.log, self._violations_path(), self.options.default_action == "kill-process")
        watched_output = WatchedOutput(output, watch)
        await self._backend.run(WatchedInput(input, watch, watched_output), watched_output)
        if watch.ignored_records:
            self.log.info("audit_records_ignored", **watch.ignored_records)
        for message in watch.problems():
            self.context.report_problem(ExitCode.FAILED, message)

    def _violations_path(self) -> str:
        """Return the file of a violations sink fed by this stage, for messages, or "" when there is none."""
        for consumer in self.context.spec.consumers_of(self.name):
            if consumer.type_name == "violations":
                return str(consumer.options.path)
        return ""

    async def teardown(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            await backend.teardown()


def kmod_settings(options: EnforceOptions) -> KmodSettings:
    """Return the kmod back end's settings from the enforce stage's options."""
    return KmodSettings(
        profile=Path(options.profile),
        seccomp_json=Path(options.seccomp_json) if options.seccomp_json else None,
        compile=compile_settings(options.default_action, options.errno),
        deny=DENY_ACTIONS[options.deny_action],
        running_margin=float(options.running_margin),
    )


class WatchedInput(Input):
    """The stage's input as passed to its back end: each event goes to ``watch`` first.

    Output lines and syscall records stop here. A record of a kill becomes a
    Violation, which is sent to ``output`` before the back end receives the
    rest of its batch.
    """

    def __init__(self, inner: Input, watch: ExitWatch, output: Output) -> None:
        self._inner = inner
        self._watch = watch
        self._output = output

    async def _batches(self) -> AsyncIterator[Batch]:
        async for batch in self._inner:
            selected = await self._see(batch)
            if selected:
                yield selected

    async def receive(self) -> Batch:
        while True:
            selected = await self._see(await self._inner.receive())
            if selected:
                return selected

    async def _see(self, batch: Batch) -> Batch:
        kills = []
        for event in batch:
            if isinstance(event, SyscallRecord):
                violation = self._watch.kill_violation(event)
                if violation is not None:
                    kills.append(violation)
            else:
                self._watch.observe(event)
        if kills:
            await self._output.send_many(kills)
            await self._output.flush()
        return tuple(event for event in batch if not isinstance(event, (ContainerOutput, SyscallRecord)))

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def aclose(self) -> None:
        await self._inner.aclose()


class WatchedOutput(Output):
    """The stage's output as passed to its back end: each Violation sent also goes to ``watch``."""

    def __init__(self, inner: Output, watch: ExitWatch) -> None:
        self._inner = inner
        self._watch = watch

    @property
    def connected(self) -> bool:
        return self._inner.connected

    @property  # type: ignore[override]
    def autoflush(self) -> bool:
        return self._inner.autoflush

    @autoflush.setter
    def autoflush(self, value: bool) -> None:
        self._inner.autoflush = value

    async def send(self, event: Event) -> None:
        self._watch.observe(event)
        await self._inner.send(event)

    async def send_many(self, events: Iterable[Event]) -> None:
        events = list(events)
        for event in events:
            self._watch.observe(event)
        await self._inner.send_many(events)

    async def flush(self) -> None:
        await self._inner.flush()

    async def aclose(self) -> None:
        await self._inner.aclose()
