"""Compile profiles into seccomp BPF programs for the enforcement back ends."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import anyio

from speaker.compile import (
    DEFAULT_INVARIANTS,
    INVARIANTS,
    Action,
    CompileError,
    CompileSettings,
    Layout,
    UnknownSyscall,
    compile_profile,
    filter_event,
    host_arches,
    parse_errno,
)
from speaker.component import Input, Output, Stage
from speaker.errors import ComponentError
from speaker.events import (
    CompiledFilter,
    ContainerEvent,
    Event,
    Phase,
    PhaseChange,
    RecordLoss,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)
from speaker.options import OptionError, option
from speaker.profiles import ProfileError, load_profile
from speaker.profiles.builder import ProfileBuilder


@dataclasses.dataclass(frozen=True)
class FilterCompileOptions:
    profile: str = option(
        "",
        help="Profile to compile when the pipeline starts (a profile directory, profile.json or Docker seccomp "
        "JSON); its filters apply to every container. Empty: compile each container traced in this pipeline "
        "when it exits and at the end.",
    )
    layouts: list[Literal["phase", "union", "notify", "notify-exact"]] = option(
        ["phase", "notify", "notify-exact"],
        help='Filters to emit: "phase" (one per phase), "union" (all phases), "notify" (running list in the '
        'kernel, the rest of booting and shutdown to the supervisor), "notify-exact" (only syscalls of all '
        "three phases in the kernel).",
    )
    default_action: Literal["kill-process", "errno", "log"] = option(
        "kill-process", help="Action for syscalls that no list names."
    )
    errno: str = option("EPERM", help='Errno that denied syscalls return when default_action is "errno", such as "EPERM" or "1".')
    invariants: list[str] = option(
        list(DEFAULT_INVARIANTS),
        help="Safety invariants: "
        + ", ".join(f"{name} ({item.action})" for name, item in INVARIANTS.items())
        + ". Remove a name to switch it off.",
    )
    arches: list[str] = option(
        [], help='Architectures the filters cover, from "x86_64", "x86" and "x32"; empty means all three.'
    )
    arch_lists: Literal["observed", "shared"] = option(
        "observed",
        help='"observed": each architecture allows the syscalls traced on it, others only the invariants; '
        '"shared": every architecture allows the union over architectures.',
    )


class FilterCompile(Stage):
    """Compile each phase of a profile into seccomp BPF (x86_64, x86 and x32) and emit CompiledFilter events.

    With ``profile`` set it compiles that file once at start. Otherwise it
    builds a profile per container from the phase-tagged trace events it
    receives, and compiles it when the container exits, and again at the end
    if later events changed its lists. A phase without syscalls is skipped with a
    warning.
    """

    type_name = "filter_compile"
    Options = FilterCompileOptions
    accepts = (SyscallCounts, SyscallRecord, PhaseChange, ContainerEvent, RecordLoss, TraceIncomplete)
    emits = (CompiledFilter,)

    @classmethod
    def check_options(cls, options: FilterCompileOptions) -> None:
        try:
            parse_errno(options.errno)
        except ValueError as exc:
            raise OptionError(str(exc), "errno") from None
        for index, name in enumerate(options.invariants):
            if name not in INVARIANTS:
                raise OptionError(
                    f"unknown safety invariant {name!r}: known invariants are {', '.join(INVARIANTS)}",
                    f"invariants[{index}]",
                )
        for index, arch in enumerate(options.arches):
            if arch not in host_arches():
                raise OptionError(f"unknown architecture {arch!r}: expected one of {', '.join(host_arches())}", f"arches[{index}]")
        if not options.layouts:
            raise OptionError("name at least one layout", "layouts")

    async def setup(self) -> None:
        options = self.options
        action = Action.parse(f"errno:{options.errno}" if options.default_action == "errno" else options.default_action)
        self._settings = CompileSettings(
            default_action=action,
            arches=tuple(options.arches) or host_arches(),
            invariants=tuple(options.invariants),
            arch_lists=options.arch_lists,
        )
        self._layouts = tuple(Layout(layout) for layout in dict.fromkeys(options.layouts))
        self._builder = ProfileBuilder(source=f"pipeline {self.context.spec.path}")
        #: The lists each container's filters were last compiled from.
        self._compiled: dict[str, dict[str, dict[Phase, frozenset[str]]]] = {}
        self._startup: list[CompiledFilter] = []
        if options.profile:
            self._startup = await anyio.to_thread.run_sync(self._compile_file, Path(options.profile))

    def _compile_file(self, path: Path) -> list[CompiledFilter]:
        try:
            profile = load_profile(path)
            result = compile_profile(profile.lists(), self._settings, self._layouts)
        except (ProfileError, UnknownSyscall, CompileError, ValueError) as exc:
            raise ComponentError(f"cannot compile the profile {path}: {exc}") from exc
        if not profile.complete:
            self.log.warning("profile_incomplete", profile=str(path), problems=profile.problems)
        events = [filter_event(program) for program in result.programs]
        self.log.info("filters_compiled", profile=str(path), filters=len(events), **_sizes(events))
        return events

    async def run(self, input: Input, output: Output) -> None:
        if self._startup:
            await output.send_many(self._startup)
            await output.flush()
        await super().run(input, output)

    async def process(self, event: Event, output: Output) -> None:
        if self.options.profile:
            return
        entry = self._builder.add(event)
        if entry is not None and entry.exited and event.container_id not in self._compiled:
            await self._emit(event.container_id, output)

    async def finish(self, output: Output) -> None:
        if self.options.profile:
            return
        for container_id in self._builder.container_ids():
            # Records that arrive after the exit can change the lists, and then the filters are compiled again.
            lists = self._builder.containers[container_id].profile.lists()
            if self._compiled.get(container_id) != lists:
                await self._emit(container_id, output)

    async def _emit(self, container_id: str, output: Output) -> None:
        profile = self._builder.profile(container_id)
        self._compiled[container_id] = profile.lists()
        try:
            result = await anyio.to_thread.run_sync(
                lambda: compile_profile(profile.lists(), self._settings, self._layouts, skip_empty=True)
            )
        except (UnknownSyscall, CompileError, ValueError) as exc:
            raise ComponentError(f"cannot compile the profile of container {container_id[:12]}: {exc}") from exc
        for skipped in result.skipped:
            self.log.warning("filter_skipped", container=container_id[:12], reason=skipped)
        events = [filter_event(program, container_id) for program in result.programs]
        self.log.info("filters_compiled", container=container_id[:12], filters=len(events), complete=profile.complete, **_sizes(events))
        await output.send_many(events)


def _sizes(events: list[CompiledFilter]) -> dict[str, int]:
    """Return the instruction count of each filter, keyed like ``phase_booting`` or ``notify``."""
    return {
        (f"{event.layout}_{event.phase}" if event.phase else event.layout).replace("-", "_"): len(event.bpf) // 8
        for event in events
    }
