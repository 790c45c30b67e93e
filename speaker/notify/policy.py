"""Phase lists turned into the supervisor's per-notification decision.

The notify layout splits a profile between the kernel and the supervisor:

* syscalls every phase allows run in the kernel (SCMP_ACT_ALLOW);
* syscalls some phase allows and another does not go to the supervisor
  (SCMP_ACT_NOTIFY), which decides from the container's current phase;
* all others get the filter's default action without reaching the supervisor.

By default the kernel allows the whole running list, so the running phase's
hot paths never leave the kernel, but then booting and shutdown also allow
every running syscall: booting allows booting ∪ running and shutdown allows
shutdown ∪ running. With ``exact``, running syscalls that booting or shutdown
lack are notified too, and each phase allows exactly its own list.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping

import pyseccomp

from speaker.events import PHASES, Phase
from speaker.notify.ioctl import AUDIT_ARCH_I386, AUDIT_ARCH_X86_64

#: libseccomp arch name -> (pyseccomp arch token, AUDIT_ARCH_* value in seccomp_data).
ARCHES: Mapping[str, tuple[int, int]] = {
    "x86_64": (pyseccomp.Arch.X86_64, AUDIT_ARCH_X86_64),
    "x86": (pyseccomp.Arch.X86, AUDIT_ARCH_I386),
    # x32 tasks report the x86_64 audit arch; their numbers carry bit 30.
    "x32": (pyseccomp.Arch.X32, AUDIT_ARCH_X86_64),
}


#: Syscalls that always reach the supervisor's slow path, even where the
#: phase allows them: the agent tracks the runtime init's execve (see
#: NotifyAgent.is_runtime_init). The notify layout notifies them for that reason.
EXEC_SYSCALLS = ("execve", "execveat")


class PhasePolicy:
    """The syscalls each phase allows, as (audit arch, number) keys for a fast membership test.

    ``lists`` maps each libseccomp arch name to its three phase lists, the
    shape of ``Profile.lists()``.
    """

    def __init__(
        self, lists: Mapping[str, Mapping[Phase, Iterable[str]]], *, exact: bool = False, runtime_rule: bool = True
    ) -> None:
        unknown = [arch for arch in lists if arch not in ARCHES]
        if unknown:
            raise ValueError(f"unsupported arch {unknown[0]!r}: expected one of {', '.join(ARCHES)}")
        if not lists:
            raise ValueError("the policy has no arch: give the phase lists of at least one")
        self.exact = exact
        #: Whether the kernel filter notifies every execve, which the runtime-init rule needs.
        self.runtime_rule = runtime_rule
        self.lists = {arch: _complete(by_phase) for arch, by_phase in lists.items()}
        keys: dict[Phase, set[int]] = {phase: set() for phase in PHASES}
        for arch, by_phase in self.lists.items():
            running = by_phase[Phase.RUNNING]
            for phase, names in by_phase.items():
                allowed = names if exact or phase is Phase.RUNNING else names | running
                keys[phase].update(_numbers(arch, allowed))
        self._keys = {phase: frozenset(numbers) for phase, numbers in keys.items()}
        self.exec_keys = frozenset(_numbers_everywhere(EXEC_SYSCALLS))
        self._fast_keys = {phase: numbers - self.exec_keys for phase, numbers in self._keys.items()}

    @classmethod
    def for_arches(
        cls,
        phase_lists: Mapping[Phase, Iterable[str]],
        arches: Iterable[str] = ("x86_64",),
        *,
        exact: bool = False,
        runtime_rule: bool = True,
    ) -> PhasePolicy:
        """Apply the same phase lists to every arch in ``arches``; names an arch lacks are skipped."""
        return cls({arch: phase_lists for arch in arches}, exact=exact, runtime_rule=runtime_rule)

    def allows(self, phase: Phase, audit_arch: int, nr: int) -> bool:
        """Return whether ``phase`` allows syscall ``nr`` of the caller's audit arch."""
        return decision_key(audit_arch, nr) in self._keys[phase]

    def keys(self, phase: Phase) -> frozenset[int]:
        """Return the allowed keys of ``phase``, for callers that test membership themselves."""
        return self._keys[phase]

    def fast_keys(self, phase: Phase) -> frozenset[int]:
        """Return the keys the responder may allow without the slow path: ``keys`` minus EXEC_SYSCALLS."""
        return self._fast_keys[phase]


def _numbers(arch: str, names: Iterable[str]) -> Iterable[int]:
    token, audit_arch = ARCHES[arch]
    for name in names:
        nr = pyseccomp.resolve_syscall(token, name)
        # libseccomp returns a negative pseudo number for a syscall that this
        # arch lacks (socketcall on x86_64, for example).
        if nr >= 0:
            yield decision_key(audit_arch, nr)


def _numbers_everywhere(names: Iterable[str]) -> Iterable[int]:
    for arch in ARCHES:
        yield from _numbers(arch, names)


def deny_errno(audit_arch: int, nr: int) -> int:
    """Return the errno that a denied syscall fails with: ENOSYS for clone3, EPERM for the others.

    glibc falls back to clone only when clone3 fails with ENOSYS. With EPERM,
    thread creation and posix_spawn fail in a phase that lacks clone3.
    """
    return errno.ENOSYS if decision_key(audit_arch, nr) in _CLONE3_KEYS else errno.EPERM


def decision_key(audit_arch: int, nr: int) -> int:
    """Combine an audit arch and a syscall number into one integer set key."""
    return (audit_arch << 32) | (nr & 0xFFFFFFFF)


def syscall_name(arch: str, nr: int) -> str:
    """Return the syscall's name on ``arch``, or ``nr<number>`` when libseccomp does not know it."""
    if arch in ARCHES:
        try:
            return pyseccomp.resolve_syscall(ARCHES[arch][0], nr).decode()
        except ValueError:
            pass
    return f"nr{nr}"


def _complete(phase_lists: Mapping[Phase, Iterable[str]]) -> dict[Phase, frozenset[str]]:
    missing = [phase.value for phase in PHASES if phase not in phase_lists]
    if missing:
        raise ValueError(f"the profile has no {', '.join(missing)} list; a notify profile needs all three phases")
    return {phase: frozenset(phase_lists[phase]) for phase in PHASES}


def _clone3_keys() -> frozenset[int]:
    keys = set()
    for token, audit_arch in ARCHES.values():
        try:
            keys.add(decision_key(audit_arch, pyseccomp.resolve_syscall(token, "clone3")))
        except ValueError:
            continue
    return frozenset(keys)


_CLONE3_KEYS = _clone3_keys()
