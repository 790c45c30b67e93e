"""Seccomp filter compilation: the library API behind the filter_compile stage.

Other back ends call these functions directly::

    from speaker.compile import CompileSettings, Layout, compile_profile

    programs = compile_profile(profile.lists(), CompileSettings())
    for program in programs:
        program.plan.layout, program.plan.phase, program.bpf

``plan_layout`` decides the action of every syscall (``FilterPlan``), and
``compile_plan`` turns a plan into BPF with libseccomp. ``install_filter``
loads a program into the calling thread, and ``speaker.compile.bpf``
evaluates a program without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from speaker.compile.actions import Action, ActionKind, parse_errno
from speaker.compile.arches import UnknownSyscall, host_arches, libseccomp_version
from speaker.compile.build import CompiledProgram, CompileError, compile_plan, export_pfc
from speaker.compile.install import install_filter
from speaker.compile.plan import (
    DEFAULT_INVARIANTS,
    INVARIANTS,
    CompileSettings,
    EmptyPhase,
    FilterPlan,
    Layout,
    PhaseLists,
    notify_plan,
    phase_plan,
    plan_layout,
    union_plan,
)
from speaker.events import PHASES, CompiledFilter

ALL_LAYOUTS: tuple[Layout, ...] = (Layout.PHASE, Layout.UNION, Layout.NOTIFY, Layout.NOTIFY_EXACT)


@dataclasses.dataclass
class CompileResult:
    """The programs compiled from one profile, and the plans skipped because a phase was empty."""

    programs: list[CompiledProgram]
    skipped: list[str]


def compile_profile(
    lists: PhaseLists,
    settings: CompileSettings | None = None,
    layouts: Iterable[Layout] = ALL_LAYOUTS,
    *,
    skip_empty: bool = False,
    binary_tree: bool = True,
) -> CompileResult:
    """Compile ``lists`` (``Profile.lists()``) into every requested layout; the phase layout gives one program per phase.

    Raises UnknownSyscall for a name libseccomp does not know, CompileError
    when libseccomp fails, and EmptyPhase for an empty phase unless
    ``skip_empty``, which records the skipped plan instead.
    """
    settings = settings or CompileSettings()
    result = CompileResult([], [])
    for layout in layouts:
        phases = PHASES if layout is Layout.PHASE else (None,)
        for phase in phases:
            try:
                plan = plan_layout(lists, layout, settings, phase)
            except EmptyPhase as exc:
                if not skip_empty:
                    raise
                result.skipped.append(f"{layout}{f' {phase}' if phase else ''}: {exc}")
                continue
            result.programs.append(compile_plan(plan, binary_tree=binary_tree))
    return result


def filter_event(program: CompiledProgram, container_id: str = "") -> CompiledFilter:
    """Return the CompiledFilter event that carries ``program``."""
    plan = program.plan
    return CompiledFilter(
        container_id=container_id,
        phase=plan.phase,
        layout=plan.layout.value,
        arches=plan.arches,
        default_action=str(plan.default_action),
        allowed=plan.allowed,
        notified=plan.notified,
        bpf=program.bpf,
        phase_lists=dict(plan.phase_lists),
        invariants={name: str(action) for name, action in sorted(plan.invariants.items())},
    )


__all__ = [
    "ALL_LAYOUTS",
    "DEFAULT_INVARIANTS",
    "INVARIANTS",
    "Action",
    "ActionKind",
    "CompileError",
    "CompileResult",
    "CompileSettings",
    "CompiledProgram",
    "EmptyPhase",
    "FilterPlan",
    "Layout",
    "PhaseLists",
    "UnknownSyscall",
    "compile_plan",
    "compile_profile",
    "export_pfc",
    "filter_event",
    "host_arches",
    "install_filter",
    "libseccomp_version",
    "notify_plan",
    "parse_errno",
    "phase_plan",
    "plan_layout",
    "union_plan",
]
