"""Event types that flow between pipeline components.

Every event is an immutable dataclass that carries the id of the container it
concerns, empty when not yet attributed. It also carries two timestamps taken
when it was made: ``wall_time`` (seconds since the epoch, for reports and for
matching other logs) and ``mono_time`` (``time.monotonic()``, for intervals
that a clock step must not distort).

Components declare the event types they accept and emit, and the pipeline
validator checks each ``inputs`` edge against those declarations before
anything starts. ``to_dict`` and ``event_from_dict`` give a JSON-friendly form,
used by the ``jsonl`` sink and the ``jsonl_replay`` source.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import types
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple


class Phase(enum.StrEnum):
    """Phases of a container's life, in the order they happen."""

    BOOTING = "booting"
    RUNNING = "running"
    SHUTDOWN = "shutdown"


PHASES: tuple[Phase, ...] = (Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN)

_EVENT_TYPES: dict[str, type[Event]] = {}


def _event(cls: type) -> type:
    """Make ``cls`` a frozen, slotted, keyword-only dataclass and register its name."""
    cls = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
    _EVENT_TYPES[cls.__name__] = cls
    return cls


@_event
class Event:
    """Base of all events.

    Subclasses outside this module (custom components may define their own) use
    the ``event_type`` decorator so that they serialize like the built-in ones.
    """

    container_id: str = ""
    wall_time: float = dataclasses.field(default_factory=time.time)
    mono_time: float = dataclasses.field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict with a ``type`` key naming the class."""
        data: dict[str, Any] = {"type": type(self).__name__}
        for field in dataclasses.fields(self):
            data[field.name] = _encode(getattr(self, field.name))
        return data


def event_type(cls: type) -> type:
    """Class decorator for custom events: a frozen dataclass known to ``event_from_dict``."""
    if not issubclass(cls, Event):
        raise TypeError(f"{cls.__qualname__} must subclass speaker.events.Event")
    return _event(cls)


# --- Container lifecycle -----------------------------------------------------


class ContainerAction(enum.StrEnum):
    """Docker event actions that SPEAKER acts on."""

    CREATE = "create"
    START = "start"
    HEALTH_STATUS = "health_status"
    KILL = "kill"
    STOP = "stop"
    DIE = "die"
    DESTROY = "destroy"
    EXEC_START = "exec_start"
    #: Synthetic action: the Docker event stream was interrupted, and events
    #: between ``gap_start`` and this event's ``wall_time`` may be missing.
    EVENTS_GAP = "events_gap"


@_event
class ContainerEvent(Event):
    """A container lifecycle change, as reported by the Docker daemon."""

    action: ContainerAction
    name: str = ""
    image: str = ""
    #: Host pid of the container's init process, 0 when unknown or gone.
    pid: int = 0
    #: Signal number of a ``kill`` action.
    signal: int | None = None
    #: The container's configured stop signal number (``StopSignal``, SIGTERM by default).
    stop_signal: int | None = None
    #: Exit code of a ``die`` action.
    exit_code: int | None = None
    #: ``healthy``, ``unhealthy`` or ``starting`` for ``health_status``.
    health: str | None = None
    #: Start of the unobserved interval for ``events_gap``, in wall-clock seconds.
    gap_start: float | None = None
    #: Docker's event time in seconds since the epoch (``timeNano`` / 1e9).
    event_time: float = 0.0
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@_event
class ContainerOutput(Event):
    """One line that the container wrote to its stdout or stderr."""

    stream: str
    line: str


# --- Syscalls ----------------------------------------------------------------


class SyscallKey(NamedTuple):
    """A syscall as a counting key.

    ``arch`` is libseccomp's architecture name (``x86_64``, ``x86``, ``x32``).
    ``name`` is empty until the ``classify`` stage resolves ``nr``.
    ``pid`` is 0 when the counts are already summed per container.
    """

    pid: int
    arch: str
    nr: int
    name: str = ""


@_event
class SyscallRecord(Event):
    """One syscall observed by the kernel, such as an audit type=SECCOMP record."""

    pid: int
    comm: str = ""
    exe: str = ""
    #: libseccomp architecture name (``x86_64``, ``x86``, ``x32``), decided by
    #: the audit ``arch`` field and, for x32, by the syscall number's x32 bit.
    arch: str
    #: Syscall number as the kernel reported it (x32 numbers keep bit 30).
    nr: int
    #: Syscall name, empty until the ``classify`` stage resolves it.
    name: str = ""
    #: Seccomp action code from the record (``code=0x7ffc0000`` is SCMP_ACT_LOG).
    action: int = 0
    #: Audit serial number, 0 when the source has none.
    serial: int = 0
    #: The kernel's timestamp of the record, in seconds since the epoch.
    record_time: float = 0.0
    source: str = ""
    #: Phase the record belongs to, set by the ``phase_machine`` stage.
    phase: Phase | None = None


@_event
class SyscallCounts(Event):
    """Syscalls counted over an interval, for sources that aggregate.

    Aggregating sources (eBPF maps, batched audit parsing) emit these instead of
    one ``SyscallRecord`` per syscall. ``counts`` maps each key to the number
    of calls seen between ``start_time`` and ``end_time`` (wall-clock seconds).
    """

    start_time: float
    end_time: float
    counts: Mapping[SyscallKey, int]
    source: str = ""
    #: Phase the counts belong to, set by the ``phase_machine`` stage.
    phase: Phase | None = None
    #: Kernel record times (first, last) of each key's calls, from sources
    #: that track them (the audit sources); empty otherwise. Both times are
    #: real calls, so the phase machine puts a key into every phase that its
    #: calls reach, instead of deciding by the whole interval.
    spans: Mapping[SyscallKey, tuple[float, float]] = dataclasses.field(default_factory=dict)


@_event
class SignalRecord(Event):
    """A signal sent to a process, from the kernel's audit records of the sending syscall.

    The audit sources emit one per receiving process while their audit rule
    on kill, tkill, tgkill and pidfd_send_signal is installed. ``classify``
    sets ``container_id`` to the receiver's container, and the phase machine
    starts the shutdown at the first stop signal.
    """

    #: Host pid (thread group id) of the process that received the signal.
    pid: int
    signal: int
    #: Host pid and command name of the process that sent the signal.
    sender_pid: int = 0
    sender_comm: str = ""
    #: Name of the sending syscall, such as ``kill``.
    syscall: str = ""
    #: Kernel time of the sending syscall, in seconds since the epoch. It has
    #: the resolution of the kernel's coarse clock, like SyscallRecord times.
    record_time: float = 0.0
    #: Audit serial number of the sending syscall's records.
    serial: int = 0
    source: str = ""
    #: True when ``classify`` found the sender in the receiver's container.
    from_container: bool = False


@_event
class RecordLoss(Event):
    """Syscall observations that a source detected as missed or unparsable.

    Any loss makes the traced profile incomplete. ``reason`` is a stable token:
    ``enobufs``, ``serial_gap``, ``kernel_lost``, ``garbled``, ``out_of_range``,
    ``rotated_away``, ``map_full``, ``late_flush``, ``unattributed`` or ``backlog``.
    """

    source: str
    reason: str
    count: int
    detail: str = ""


# --- Process sampling --------------------------------------------------------


class TaskSample(NamedTuple):
    """One task (thread) of a sampled container."""

    pid: int
    tid: int
    comm: str
    #: Scheduler state letter from /proc/PID/task/TID/stat (R, S, D, T, Z, I).
    state: str
    #: Syscall number the task is blocked in, None when running or unknown.
    syscall: int | None
    #: User plus system CPU time, in clock ticks.
    cpu_ticks: int


@_event
class ProcessSample(Event):
    """A snapshot of a container's tasks and listening sockets."""

    tasks: tuple[TaskSample, ...]
    #: TCP ports in LISTEN inside the container's network namespace.
    listening_ports: tuple[int, ...] = ()
    #: Sum of ``cpu_ticks`` over ``tasks``.
    cpu_ticks: int = 0


# --- Phases and enforcement --------------------------------------------------


@_event
class PhaseChange(Event):
    """A container entered ``phase``.

    ``reason`` is a sentence for people, ``detector`` the stable name of what
    decided (``start``, ``window``, ``health``, ``listen``, ``log``,
    ``quiescence``, ``delay``, ``signal`` for the kernel's record of a stop
    signal, ``kill``, ``stop``, ``die``).
    """

    phase: Phase
    previous: Phase | None = None
    reason: str = ""
    detector: str = ""
    #: Wall-clock time at which the phase began (kernel record times are
    #: compared with it), 0.0 when unknown. ``wall_time`` is when the change
    #: was decided, which can be later.
    start_time: float = 0.0


@_event
class TraceIncomplete(Event):
    """A container's trace misses part of its life, so its profile must be marked incomplete.

    ``reason`` is a stable token: ``detector_timeout`` (not found ready in
    time), ``exited_while_booting``, ``stopped_while_booting`` or
    ``ended_while_booting`` (the trace ended first).
    ``detail`` is a sentence for people.
    """

    reason: str
    detail: str = ""


@_event
class CompiledFilter(Event):
    """A seccomp BPF program compiled from a profile.

    ``layout`` is ``phase`` for a filter that enforces one phase's list on its
    own, ``union`` for one that allows all phases' lists, or ``notify`` (or
    ``notify-exact``) for the user-notification layout, where ``allowed`` runs
    in the kernel and ``notified`` goes to the supervisor. ``bpf`` is the raw
    program (struct sock_filter array, 8 bytes per instruction) for all of
    ``arches``. An empty ``container_id`` means the filter applies to every
    container of the pipeline.
    """

    phase: Phase | None
    layout: str
    arches: tuple[str, ...]
    default_action: str
    allowed: frozenset[str]
    notified: frozenset[str] = frozenset()
    bpf: bytes = b""
    #: Phase lists the filter was made from, for consumers that decide per phase.
    phase_lists: Mapping[Phase, frozenset[str]] = dataclasses.field(default_factory=dict)
    #: Syscalls whose action a safety invariant set, with that action, such as
    #: ``{"exit_group": "allow", "clone3": "errno:ENOSYS"}``.
    invariants: Mapping[str, str] = dataclasses.field(default_factory=dict)


@_event
class Violation(Event):
    """A syscall outside the current phase's list.

    ``action`` is what happened to it: ``denied`` (errno), ``killed``, or
    ``allowed`` in complain mode.
    """

    phase: Phase
    pid: int
    comm: str = ""
    syscall: str
    arch: str
    action: str
    nr: int = -1


# --- Serialization -----------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (frozenset, set)):
        return sorted(_encode(item) for item in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {key: _encode(item) for key, item in zip(value._fields, value)}
    if isinstance(value, (tuple, list)):
        return [_encode(item) for item in value]
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value):
            return {key: _encode(item) for key, item in value.items()}
        # Keys such as SyscallKey are not JSON object keys: store pairs.
        return [[_encode(key), _encode(item)] for key, item in value.items()]
    return value


def _decode(hint: Any, value: Any) -> Any:
    """Convert JSON ``value`` back to the type named by the annotation ``hint``."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is bytes:
        return bytes.fromhex(value)
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
        hints = typing.get_type_hints(hint)
        return hint(**{key: _decode(hints[key], item) for key, item in value.items()})
    if origin in (frozenset, set):
        return origin(_decode(args[0], item) for item in value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], item) for item in value)
        return tuple(_decode(arg, item) for arg, item in zip(args, value))
    if origin in (Mapping, dict) or hint is Mapping:
        key_hint, value_hint = args if args else (Any, Any)
        pairs = value.items() if isinstance(value, dict) else value
        return {_decode(key_hint, key): _decode(value_hint, item) for key, item in pairs}
    if hint in (int, float, str, bool):
        # bool is an int in Python, and an int is a valid float in JSON.
        valid = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not valid:
            raise ValueError(f"expected {hint.__name__}, got {value!r}")
    return value


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from ``Event.to_dict`` output.

    Raises ValueError naming the type or field that does not match.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"an event must be a JSON object, got {type(data).__name__}")
    type_name = data.get("type")
    cls = _EVENT_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        known = ", ".join(sorted(_EVENT_TYPES))
        raise ValueError(f"unknown event type {type_name!r}; known types: {known}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            try:
                kwargs[field.name] = _decode(hints[field.name], data[field.name])
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                raise ValueError(f"{type_name}.{field.name}: invalid value {data[field.name]!r}: {exc}") from exc
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{type_name}: {exc}") from exc


def event_types() -> Mapping[str, type[Event]]:
    """Return every registered event class by name."""
    return types.MappingProxyType(_EVENT_TYPES)
