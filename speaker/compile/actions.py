"""Seccomp actions: what a filter does with a syscall, in the forms each consumer needs.

One ``Action`` converts to the kernel's SECCOMP_RET_* value (for BPF and for
decoding loaded filters), to libseccomp's constant, and to the SCMP_ACT_*
strings of Docker, OCI and the Security Profiles Operator. Its text form, such
as ``kill-process`` or ``errno:EPERM``, is what pipeline options,
``CompiledFilter.default_action`` and profile.json use.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as errno_module

import pyseccomp

# SECCOMP_RET_* values from include/uapi/linux/seccomp.h.
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF


class ActionKind(enum.StrEnum):
    """Seccomp actions by the names SPEAKER writes."""

    ALLOW = "allow"
    KILL_PROCESS = "kill-process"
    KILL_THREAD = "kill-thread"
    ERRNO = "errno"
    LOG = "log"
    NOTIFY = "notify"
    TRAP = "trap"
    TRACE = "trace"


_RET_BY_KIND = {
    ActionKind.ALLOW: RET_ALLOW,
    ActionKind.KILL_PROCESS: RET_KILL_PROCESS,
    ActionKind.KILL_THREAD: RET_KILL_THREAD,
    ActionKind.ERRNO: RET_ERRNO,
    ActionKind.LOG: RET_LOG,
    ActionKind.NOTIFY: RET_USER_NOTIF,
    ActionKind.TRAP: RET_TRAP,
    ActionKind.TRACE: RET_TRACE,
}
_KIND_BY_RET = {value: kind for kind, value in _RET_BY_KIND.items()}

_SCMP_BY_KIND = {
    ActionKind.ALLOW: "SCMP_ACT_ALLOW",
    ActionKind.KILL_PROCESS: "SCMP_ACT_KILL_PROCESS",
    ActionKind.KILL_THREAD: "SCMP_ACT_KILL_THREAD",
    ActionKind.ERRNO: "SCMP_ACT_ERRNO",
    ActionKind.LOG: "SCMP_ACT_LOG",
    ActionKind.NOTIFY: "SCMP_ACT_NOTIFY",
    ActionKind.TRAP: "SCMP_ACT_TRAP",
    ActionKind.TRACE: "SCMP_ACT_TRACE",
}
_KIND_BY_SCMP = {value: kind for kind, value in _SCMP_BY_KIND.items()}
# SCMP_ACT_KILL is libseccomp's old name for killing the thread.
_KIND_BY_SCMP["SCMP_ACT_KILL"] = ActionKind.KILL_THREAD


def parse_errno(text: str | int) -> int:
    """Return the errno value of a name such as ``EPERM`` or a number such as ``1``.

    Raises ValueError for an unknown name or a value outside 1..4095, the
    range that seccomp can return.
    """
    if isinstance(text, int) or text.strip().isdigit():
        value = int(text)
    else:
        name = text.strip().upper()
        value = getattr(errno_module, name, None) if name.startswith("E") else None
        if not isinstance(value, int):
            raise ValueError(f"unknown errno name {text!r}: write a name such as EPERM or a number such as 1")
    if not 1 <= value <= 4095:
        raise ValueError(f"errno value {value} is outside 1..4095, the range a seccomp filter can return")
    return value


def errno_name(value: int) -> str:
    """Return the symbolic name of an errno value, or the number as text when it has none."""
    return errno_module.errorcode.get(value, str(value))


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    """One seccomp action, with its errno value for ``errno``."""

    kind: ActionKind
    errno: int = 0

    def __post_init__(self) -> None:
        # errno 0 is valid in a loaded filter: the syscall is skipped and returns 0.
        if self.kind is ActionKind.ERRNO and not 0 <= self.errno <= 4095:
            raise ValueError(f"an errno action needs a value in 0..4095, got {self.errno}")
        if self.kind is not ActionKind.ERRNO and self.errno:
            raise ValueError(f"only errno actions carry an errno value, not {self.kind.value}")

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse ``allow``, ``kill-process``, ``log``, ``errno:EPERM`` or ``errno:1``.

        A bare ``errno`` means EPERM. Raises ValueError listing the accepted forms.
        """
        kind_text, _, value_text = text.strip().partition(":")
        try:
            kind = ActionKind(kind_text.lower())
        except ValueError:
            choices = ", ".join(kind.value for kind in ActionKind)
            raise ValueError(f"unknown seccomp action {text!r}: expected one of {choices}, or errno:NAME") from None
        if kind is ActionKind.ERRNO:
            return cls(kind, parse_errno(value_text) if value_text else errno_module.EPERM)
        if value_text:
            raise ValueError(f"invalid seccomp action {text!r}: only errno takes a value after ':'")
        return cls(kind)

    def __str__(self) -> str:
        if self.kind is ActionKind.ERRNO:
            return f"errno:{errno_name(self.errno)}"
        return self.kind.value

    @property
    def ret(self) -> int:
        """Return the SECCOMP_RET_* value a BPF program returns for this action."""
        return _RET_BY_KIND[self.kind] | (self.errno if self.kind is ActionKind.ERRNO else 0)

    @property
    def libseccomp(self) -> int:
        """Return the action value that pyseccomp's rule and filter calls take."""
        if self.kind is ActionKind.ERRNO:
            return pyseccomp.ERRNO(self.errno)
        if self.kind is ActionKind.TRACE:
            return pyseccomp.TRACE(0)
        return self.ret

    @property
    def scmp(self) -> str:
        """Return the SCMP_ACT_* name that Docker and OCI JSON use."""
        return _SCMP_BY_KIND[self.kind]

    @classmethod
    def from_ret(cls, value: int) -> Action:
        """Decode a SECCOMP_RET_* value. Raises ValueError for one the kernel does not define."""
        full = value & RET_ACTION_FULL
        kind = _KIND_BY_RET.get(full)
        if kind is None:
            raise ValueError(f"unknown seccomp return value {value:#010x}")
        if kind is ActionKind.ERRNO:
            # The kernel caps the errno data at MAX_ERRNO (4095).
            return cls(kind, min(value & RET_DATA, 4095))
        return cls(kind)

    @classmethod
    def from_scmp(cls, name: str, errno_value: int | None = None) -> Action:
        """Build an action from a SCMP_ACT_* name and an optional errnoRet. Raises ValueError."""
        kind = _KIND_BY_SCMP.get(name)
        if kind is None:
            raise ValueError(f"unknown seccomp action {name!r}: expected one of {', '.join(sorted(_KIND_BY_SCMP))}")
        if kind is ActionKind.ERRNO:
            return cls(kind, errno_value if errno_value is not None else errno_module.EPERM)
        return cls(kind)


ALLOW = Action(ActionKind.ALLOW)
KILL_PROCESS = Action(ActionKind.KILL_PROCESS)
LOG = Action(ActionKind.LOG)
NOTIFY = Action(ActionKind.NOTIFY)
ENOSYS = Action(ActionKind.ERRNO, errno_module.ENOSYS)
