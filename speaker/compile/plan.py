"""Filter plans: the action every syscall gets, decided before any BPF exists.

A plan is the single description that both the BPF builder and the Docker JSON
writer turn into output, so the two cannot disagree. Three layouts exist:

* ``phase``: one phase's list is allowed, everything else gets the default
  action.
* ``union``: the union of all three lists is allowed, which is the one
  filter a runtime without phase switching can enforce for a whole life.
* ``notify``: the running list is allowed in the kernel, (booting ∪
  shutdown) − running goes to the user-space supervisor (SCMP_ACT_NOTIFY),
  and everything else gets the default action. Running-phase hot paths never
  leave the kernel, but booting and shutdown also allow the running list.
* ``notify-exact``: only syscalls in all three lists are allowed in the
  kernel, and the supervisor decides every other listed syscall, so each
  phase allows exactly its own list at the cost of more notifications.

Safety invariants then change the action of a few syscalls that would
otherwise get the default action. Each can be switched off by name.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Literal

from speaker.compile.actions import ALLOW, ENOSYS, KILL_PROCESS, NOTIFY, Action, ActionKind
from speaker.compile.arches import check_syscall, host_arches, syscall_table
from speaker.events import PHASES, Phase

#: Phase lists by architecture and phase: the shape of ``Profile.syscalls``.
PhaseLists = Mapping[str, Mapping[Phase, Iterable[str]]]


class Layout(enum.StrEnum):
    """Division of syscalls between the kernel and the user-space supervisor."""

    PHASE = "phase"
    UNION = "union"
    NOTIFY = "notify"
    NOTIFY_EXACT = "notify-exact"


@dataclasses.dataclass(frozen=True)
class Invariant:
    """A syscall rule that keeps processes working whatever the lists contain."""

    name: str
    syscalls: tuple[str, ...]
    action: Action
    reason: str


#: The safety invariants by name, all on by default.
INVARIANTS: Mapping[str, Invariant] = {
    item.name: item
    for item in (
        Invariant("exit", ("exit",), ALLOW, "a thread must always be able to end"),
        Invariant("exit_group", ("exit_group",), ALLOW, "a process must always be able to end"),
        Invariant(
            "rt_sigreturn",
            ("rt_sigreturn", "sigreturn"),
            ALLOW,
            "returning from a signal handler must work, or every handled signal kills the process",
        ),
        Invariant(
            "restart_syscall",
            ("restart_syscall",),
            ALLOW,
            "the kernel itself issues it to resume an interrupted sleep",
        ),
        Invariant(
            "clone3_enosys",
            ("clone3",),
            ENOSYS,
            "glibc falls back to clone when clone3 fails with ENOSYS, but dies when it is killed",
        ),
    )
}
DEFAULT_INVARIANTS: tuple[str, ...] = tuple(INVARIANTS)

#: ``observed``: each arch allows the names traced on that arch, and an arch
#: never seen allows only the invariants. ``shared``: every arch allows the
#: union over arches, as Docker and OCI profiles do.
ArchLists = Literal["observed", "shared"]


class EmptyPhase(ValueError):
    """A phase that has no syscalls, so a filter for it would allow nothing."""


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """Choices that turn phase lists into filters."""

    default_action: Action = KILL_PROCESS
    arches: tuple[str, ...] = dataclasses.field(default_factory=host_arches)
    invariants: tuple[str, ...] = DEFAULT_INVARIANTS
    arch_lists: ArchLists = "observed"

    def __post_init__(self) -> None:
        unknown = [name for name in self.invariants if name not in INVARIANTS]
        if unknown:
            raise ValueError(f"unknown safety invariant {unknown[0]!r}: known invariants are {', '.join(INVARIANTS)}")
        for arch in self.arches:
            syscall_table(arch)
        if not self.arches:
            raise ValueError("a filter needs at least one architecture")
        if self.default_action.kind in (ActionKind.ALLOW, ActionKind.NOTIFY):
            raise ValueError(f"default action {self.default_action} would make the allow-lists meaningless")


@dataclasses.dataclass(frozen=True)
class FilterPlan:
    """The action of every listed syscall, per architecture; unlisted ones get ``default_action``."""

    layout: Layout
    #: The enforced phase for the ``phase`` layout, None for the other layouts.
    phase: Phase | None
    arches: tuple[str, ...]
    default_action: Action
    rules: Mapping[str, Mapping[str, Action]]
    #: Syscalls whose action a safety invariant set on at least one arch, by name.
    invariants: Mapping[str, Action]
    #: The phase lists the plan was made from, as the union over arches.
    phase_lists: Mapping[Phase, frozenset[str]]
    #: Arches whose lists name at least one syscall; the others allow only the invariants.
    listed_arches: tuple[str, ...] = ()

    def action(self, arch: str, name: str) -> Action:
        """Return the action for syscall ``name`` of ``arch``."""
        return self.rules.get(arch, {}).get(name, self.default_action)

    def names_with(self, action: Action, arch: str | None = None) -> frozenset[str]:
        """Return the names that get ``action`` on ``arch``, or on any arch when None."""
        arches = (arch,) if arch is not None else self.arches
        return frozenset(name for item in arches for name, value in self.rules.get(item, {}).items() if value == action)

    @property
    def allowed(self) -> frozenset[str]:
        return self.names_with(ALLOW)

    @property
    def notified(self) -> frozenset[str]:
        return self.names_with(NOTIFY)

    @property
    def rule_actions(self) -> tuple[Action, ...]:
        """Return every action a rule uses, sorted, for writers that group names by action."""
        return tuple(sorted({action for by_name in self.rules.values() for action in by_name.values()}))


def arch_phase_lists(lists: PhaseLists, settings: CompileSettings) -> dict[str, dict[Phase, frozenset[str]]]:
    """Return the names each filter arch gets per phase, checked against libseccomp.

    Raises UnknownSyscall for a name the arch does not have (only for names
    the profile lists under that arch), and ValueError for an arch outside
    ``settings.arches``.
    """
    foreign = [arch for arch in lists if arch not in settings.arches and _has_names(lists[arch])]
    if foreign:
        raise ValueError(
            f"the profile has syscalls for {', '.join(foreign)}, but the filter covers only {', '.join(settings.arches)}"
        )
    checked: dict[str, dict[Phase, frozenset[str]]] = {}
    for arch, by_phase in lists.items():
        checked[arch] = {}
        for phase in PHASES:
            names = frozenset(by_phase.get(phase, ()))
            for name in names:
                check_syscall(arch, name)
            checked[arch][phase] = names
    if settings.arch_lists == "observed":
        return {arch: checked.get(arch, {phase: frozenset() for phase in PHASES}) for arch in settings.arches}
    shared: dict[str, dict[Phase, frozenset[str]]] = {}
    for arch in settings.arches:
        table = syscall_table(arch)
        shared[arch] = {
            phase: frozenset(
                name for by_phase in checked.values() for name in by_phase[phase] if table.number(name) is not None
            )
            for phase in PHASES
        }
    return shared


def phase_plan(lists: PhaseLists, phase: Phase, settings: CompileSettings) -> FilterPlan:
    """Plan a filter that allows one phase's list. Raises EmptyPhase when the phase has no syscalls."""
    per_arch = arch_phase_lists(lists, settings)
    if not any(per_arch[arch][phase] for arch in per_arch):
        raise EmptyPhase(f"the {phase} phase has no syscalls, so its filter would allow nothing")
    rules = {arch: {name: ALLOW for name in per_arch[arch][phase]} for arch in settings.arches}
    return _finish(Layout.PHASE, phase, rules, per_arch, settings)


def union_plan(lists: PhaseLists, settings: CompileSettings) -> FilterPlan:
    """Plan a filter that allows every phase's syscalls. Raises EmptyPhase when all phases are empty."""
    per_arch = arch_phase_lists(lists, settings)
    rules = {arch: {name: ALLOW for phase in PHASES for name in per_arch[arch][phase]} for arch in settings.arches}
    if not any(rules.values()):
        raise EmptyPhase("the profile has no syscalls, so its filter would allow nothing")
    return _finish(Layout.UNION, None, rules, per_arch, settings)


def notify_plan(lists: PhaseLists, settings: CompileSettings, *, exact: bool = False) -> FilterPlan:
    """Plan the notify layout (``exact`` for notify-exact). Raises EmptyPhase when a phase has no syscalls."""
    per_arch = arch_phase_lists(lists, settings)
    for phase in PHASES:
        if not any(per_arch[arch][phase] for arch in per_arch):
            raise EmptyPhase(f"the {phase} phase has no syscalls, so the notify layout cannot be built")
    rules: dict[str, dict[str, Action]] = {}
    for arch in settings.arches:
        booting, running, shutdown = (per_arch[arch][phase] for phase in PHASES)
        in_kernel = running & booting & shutdown if exact else running
        notified = (booting | running | shutdown) - in_kernel
        rules[arch] = {name: ALLOW for name in in_kernel} | {name: NOTIFY for name in notified}
    layout = Layout.NOTIFY_EXACT if exact else Layout.NOTIFY
    return _finish(layout, None, rules, per_arch, settings)


def plan_layout(lists: PhaseLists, layout: Layout, settings: CompileSettings, phase: Phase | None = None) -> FilterPlan:
    """Plan ``layout``; ``phase`` is required for the phase layout and ignored otherwise."""
    if layout is Layout.PHASE:
        if phase is None:
            raise ValueError("the phase layout needs a phase")
        return phase_plan(lists, phase, settings)
    if layout is Layout.UNION:
        return union_plan(lists, settings)
    return notify_plan(lists, settings, exact=layout is Layout.NOTIFY_EXACT)


def invariant_rules(settings: CompileSettings, arch: str) -> dict[str, Action]:
    """Return the rules the enabled invariants add on ``arch``, for syscalls the arch has."""
    table = syscall_table(arch)
    rules: dict[str, Action] = {}
    for key in settings.invariants:
        invariant = INVARIANTS[key]
        for name in invariant.syscalls:
            if table.number(name) is not None:
                rules[name] = invariant.action
    return rules


def _finish(
    layout: Layout,
    phase: Phase | None,
    rules: dict[str, dict[str, Action]],
    per_arch: Mapping[str, Mapping[Phase, frozenset[str]]],
    settings: CompileSettings,
) -> FilterPlan:
    applied: dict[str, Action] = {}
    for arch in settings.arches:
        for name, action in invariant_rules(settings, arch).items():
            # An invariant replaces the default action, so a listed syscall
            # keeps the action the lists gave it. An invariant that allows
            # also replaces a notification: the supervisor would deny
            # rt_sigreturn or exit_group in a phase whose list lacks it, and
            # the process would crash or hang instead of ending cleanly.
            current = rules[arch].get(name)
            if current is None or (current == NOTIFY and action == ALLOW):
                rules[arch][name] = action
                applied[name] = action
    phase_lists = {item: frozenset().union(*(per_arch[arch][item] for arch in per_arch)) for item in PHASES}
    return FilterPlan(
        layout=layout,
        phase=phase,
        arches=settings.arches,
        default_action=settings.default_action,
        rules=rules,
        invariants=applied,
        phase_lists=phase_lists,
        listed_arches=tuple(arch for arch in settings.arches if any(per_arch[arch].values())),
    )


def _has_names(by_phase: Mapping[Phase, Iterable[str]]) -> bool:
    return any(True for names in by_phase.values() for _ in names)
