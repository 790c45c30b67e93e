"""The kmod back end of the ``enforce`` stage: compile a profile's phase programs and enforce them with the kernel module.

The container starts under the union of its phases (``seccomp_json``),
because the module swaps programs inside the filter that the runtime
installed. Each phase program allows the phase's list and gives the deny
action (EPERM, or killing the process) to the syscalls that only other
phases list. Syscalls that no list names get the default action. The notify
back end splits syscalls the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio

from speaker.compile import CompiledProgram, CompileError, UnknownSyscall, compile_plan
from speaker.compile.actions import KILL_PROCESS, Action
from speaker.compile.plan import CompileSettings, EmptyPhase, FilterPlan, arch_phase_lists, phase_plan, union_plan
from speaker.component import Input, Output
from speaker.engine import PipelineContext
from speaker.enforce_profile import FilledLists, load_enforced_lists, write_seccomp_json
from speaker.errors import ComponentError
from speaker.events import PHASES, CompiledFilter, ContainerAction, ContainerEvent, Event, Phase, PhaseChange
from speaker.kmod_driver import KmodDriver, KmodOptions

#: The deny action of each ``deny_action`` option value.
DENY_ACTIONS: dict[str, Action] = {"errno": Action.parse("errno:EPERM"), "kill": KILL_PROCESS}


@dataclasses.dataclass(frozen=True)
class KmodSettings:
    """Settings of the kmod back end, from the enforce stage's options."""

    profile: Path
    #: Path of the union profile that the container starts under, or None to write none.
    seccomp_json: Path | None
    compile: CompileSettings
    #: Action for syscalls that another phase lists but the current one does not.
    deny: Action
    #: Seconds after the switch to running during which the booting list is allowed too.
    running_margin: float


@dataclasses.dataclass(frozen=True)
class KmodPrograms:
    """The programs compiled from one profile."""

    phases: dict[Phase, CompiledProgram]
    #: The running program of the running margin (booting and running lists), None without a margin.
    margin: CompiledProgram | None
    #: The filter the container starts under.
    union: FilterPlan


def phase_program_plan(lists: FilledLists, phase: Phase, settings: CompileSettings, deny: Action) -> FilterPlan:
    """Plan the program of ``phase``: the phase layout, plus ``deny`` for the syscalls that only other phases list.

    A rule that equals the default action is left out, because libseccomp
    rejects it (EACCES), and the default action gives the same result.
    Safety invariants keep their action.
    """
    plan = phase_plan(lists, phase, settings)
    if deny == settings.default_action:
        return plan
    per_arch = arch_phase_lists(lists, settings)
    rules = {}
    for arch in settings.arches:
        listed = frozenset().union(*per_arch[arch].values())
        rules[arch] = {name: deny for name in listed} | dict(plan.rules.get(arch, {}))
    return dataclasses.replace(plan, rules=rules)


def compile_kmod_programs(lists: FilledLists, settings: CompileSettings, deny: Action, *, margin: bool) -> KmodPrograms:
    """Compile the three phase programs, the margin program when ``margin`` is set, and plan the union filter.

    Raises UnknownSyscall, EmptyPhase, CompileError or ValueError as the compile functions do.
    """
    phases = {phase: compile_plan(phase_program_plan(lists, phase, settings, deny)) for phase in PHASES}
    margin_program = None
    if margin:
        widened = {
            arch: {**by_phase, Phase.RUNNING: by_phase[Phase.BOOTING] | by_phase[Phase.RUNNING]}
            for arch, by_phase in lists.items()
        }
        margin_program = compile_plan(phase_program_plan(widened, Phase.RUNNING, settings, deny))
    return KmodPrograms(phases=phases, margin=margin_program, union=union_plan(lists, settings))


class KmodBackend:
    """Load a profile's phase programs into the kernel module for each container, and switch them on PhaseChange.

    ``name`` is the stage's name in the pipeline, for messages that name its
    options. Emits no events: a denied syscall gets its action in the
    kernel, and nothing reports it.
    """

    def __init__(self, name: str, settings: KmodSettings, options: KmodOptions, log: Any, context: PipelineContext) -> None:
        self.name = name
        self.settings = settings
        self.log = log
        self.driver = KmodDriver(options, log, context)
        # Containers in their running margin, with the scope of the task that ends it.
        self._margins: dict[str, anyio.CancelScope] = {}
        self._ignored_filters = False

    async def setup(self) -> None:
        self.driver.open()
        try:
            self.programs = await anyio.to_thread.run_sync(self.load_programs)
        except BaseException:
            # The engine calls teardown only after a setup that succeeded.
            await self.driver.close()
            raise
        for phase, program in self.programs.phases.items():
            self.driver.set_program("", phase, program.bpf)

    def load_programs(self) -> KmodPrograms:
        """Read and compile the profile, and write the union profile to ``seccomp_json``. Raises ComponentError."""
        settings = self.settings
        lists = load_enforced_lists(settings.profile, self.name, self.log)
        try:
            programs = compile_kmod_programs(lists, settings.compile, settings.deny, margin=settings.running_margin > 0)
        except (UnknownSyscall, EmptyPhase, CompileError, ValueError) as exc:
            raise ComponentError(f"cannot use the profile {settings.profile}: {exc}") from exc
        self.log.info(
            "programs_compiled",
            profile=str(settings.profile),
            deny_action=str(settings.deny),
            default_action=str(settings.compile.default_action),
            instructions={str(phase): program.instructions for phase, program in programs.phases.items()},
            margin_instructions=programs.margin.instructions if programs.margin else None,
        )
        if settings.seccomp_json is not None:
            write_seccomp_json(programs.union, settings.seccomp_json, self.log)
        return programs

    async def run(self, input: Input, output: Output) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            async for batch in input:
                for event in batch:
                    await self._handle(event)
            group.cancel_scope.cancel()

    async def _handle(self, event: Event) -> None:
        if isinstance(event, PhaseChange):
            self._change_phase(event)
        elif isinstance(event, ContainerEvent):
            # TODO: runc gives each docker exec process a new filter, which is never registered, so exec'd
            # programs run under the union filter in every phase.
            if event.action in (ContainerAction.DIE, ContainerAction.DESTROY):
                scope = self._margins.pop(event.container_id, None)
                if scope is not None:
                    scope.cancel()
            await self.driver.container_event(event)
        elif isinstance(event, CompiledFilter) and not self._ignored_filters:
            self._ignored_filters = True
            self.log.info("compiled_filter_ignored", layout=event.layout, reason="the kmod back end compiles `profile` itself")

    def _change_phase(self, event: PhaseChange) -> None:
        container_id = event.container_id
        self._end_margin(container_id)
        margin = self.programs.margin
        if event.phase is Phase.RUNNING and margin is not None:
            # The module keeps one program per phase, so the margin runs
            # as the running phase with a program that also allows the booting
            # list. When the margin ends, the running list's own program
            # replaces it in place.
            self.driver.set_program(container_id, Phase.RUNNING, margin.bpf)
            self.driver.set_phase(container_id, Phase.RUNNING)
            self.log.info(
                "running_margin_started",
                container=container_id[:12],
                margin=f"{self.settings.running_margin:g}s",
                allowed="booting and running lists",
            )
            scope = anyio.CancelScope()
            self._margins[container_id] = scope
            self._group.start_soon(self._end_margin_later, scope, container_id)
            return
        self.driver.set_phase(container_id, event.phase)

    async def _end_margin_later(self, scope: anyio.CancelScope, container_id: str) -> None:
        with scope:
            await anyio.sleep(self.settings.running_margin)
            self._end_margin(container_id)

    def _end_margin(self, container_id: str) -> None:
        """Put the running list's own program back for a container in its running margin."""
        scope = self._margins.pop(container_id, None)
        if scope is None:
            return
        scope.cancel()
        self.driver.set_program(container_id, Phase.RUNNING, self.programs.phases[Phase.RUNNING].bpf)
        self.log.info("running_margin_ended", container=container_id[:12])

    async def teardown(self) -> None:
        await self.driver.close()
