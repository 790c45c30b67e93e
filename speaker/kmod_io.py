"""The /dev/speaker ioctl ABI (kmod/speaker_ioctl.h) for Python.

The kernel module keeps one seccomp BPF program per phase for each
registered container and swaps them inside the filter that the container
runtime installed, so every task of the container changes phase at once.
``KmodDevice`` wraps the seven ioctls. The structures below mirror the C header
field by field, and tests/kmod/test_abi.py compiles the header to check the
numbers and sizes.

The calls go through libc's ``ioctl`` with ctypes, so the structure is
updated in place: on a rejected program the module fills in the failing
instruction and the reason before returning EINVAL.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno
import os
from pathlib import Path
from types import TracebackType

from speaker.events import Phase

ABI_VERSION = 1
DEVICE = Path("/dev/speaker")
IOC_MAGIC = 0xB9

#: Maximum instructions of one classic BPF program (BPF_MAXINSNS).
MAX_INSNS = 4096
#: Bytes per struct sock_filter instruction.
INSN_SIZE = 8
#: error_insn value when no single instruction is at fault.
NO_INSN = 0xFFFFFFFF

REGISTER_NEWEST = 1 << 0
REGISTER_ADOPT = 1 << 1
SWITCH_FORCE = 1 << 0
STATE_ALIVE = 1 << 0
STATE_STOP_SEEN = 1 << 1
UNREGISTER_RESTORE = 1 << 0


class KmodPhase(enum.IntEnum):
    """Phase numbers of the module. ORIGINAL is the program the runtime installed."""

    ORIGINAL = 0
    BOOTING = 1
    RUNNING = 2
    SHUTDOWN = 3

    @classmethod
    def of(cls, phase: Phase | KmodPhase) -> KmodPhase:
        """Return the module's number for a pipeline phase."""
        if isinstance(phase, KmodPhase):
            return phase
        return cls[Phase(phase).name]

    @property
    def pipeline_phase(self) -> Phase | None:
        """Return the pipeline phase, or None for ORIGINAL."""
        return None if self is KmodPhase.ORIGINAL else Phase[self.name]


class LoadError(enum.IntEnum):
    """Reason code of a rejected program (enum speaker_load_error)."""

    OK = 0
    LENGTH = 1
    OPCODE = 2
    JUMP = 3
    NO_RET = 4
    OFFSET = 5
    MEM_INDEX = 6
    MEM_UNINIT = 7
    DIV_ZERO = 8
    SHIFT = 9
    PATH_LENGTH = 10
    CHANGED = 11
    KERNEL = 12

    @property
    def description(self) -> str:
        return _LOAD_ERROR_TEXT[self]


_LOAD_ERROR_TEXT = {
    LoadError.OK: "no error",
    LoadError.LENGTH: f"the program must have 1 to {MAX_INSNS} instructions",
    LoadError.OPCODE: "opcode not allowed in seccomp programs",
    LoadError.JUMP: "jump target outside the program",
    LoadError.NO_RET: "the last instruction is not a return",
    LoadError.OFFSET: "load from struct seccomp_data is unaligned or out of bounds",
    LoadError.MEM_INDEX: "scratch memory index is 16 or more",
    LoadError.MEM_UNINIT: "scratch memory is read before any store on some path",
    LoadError.DIV_ZERO: "division by the constant 0",
    LoadError.SHIFT: "constant shift of 32 or more",
    LoadError.PATH_LENGTH: "the filter chain would exceed seccomp's 32768 instructions per path",
    LoadError.CHANGED: "the program changed in memory while the module copied it",
    LoadError.KERNEL: "the kernel's classic BPF check rejected the program",
}


# --- Structures (kmod/speaker_ioctl.h) ---------------------------------------


class VersionStruct(ctypes.Structure):
    _fields_ = (
        ("abi_version", ctypes.c_uint32),
        ("max_groups", ctypes.c_uint32),
        ("groups", ctypes.c_uint32),
        ("retired", ctypes.c_uint32),
    )


class RegisterStruct(ctypes.Structure):
    _fields_ = (
        ("abi_version", ctypes.c_uint32),
        ("pid", ctypes.c_int32),
        ("stop_signal", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("id", ctypes.c_uint64),
    )


class LoadStruct(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("phase", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("filter", ctypes.c_uint64),
        ("error_insn", ctypes.c_uint32),
        ("error_reason", ctypes.c_uint32),
    )


class SwitchStruct(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("phase", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class StateStruct(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_int32),
        ("phase", ctypes.c_uint32),
        ("loaded", ctypes.c_uint32),
        ("stop_signal", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("filter_refs", ctypes.c_uint32),
        ("filter_users", ctypes.c_uint32),
        ("filter_depth", ctypes.c_uint32),
        ("switches", ctypes.c_uint64),
        ("switch_ns", ctypes.c_uint64),
    )


class UnregisterStruct(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


CACHE_BITMAP_WORDS = 16


class CacheStruct(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("native_bits", ctypes.c_uint32),
        ("compat_bits", ctypes.c_uint32),
        ("native", ctypes.c_uint64 * CACHE_BITMAP_WORDS),
        ("compat", ctypes.c_uint64 * CACHE_BITMAP_WORDS),
    )


# --- Ioctl numbers (asm-generic/ioctl.h layout, as on x86) -------------------

_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, number: int, structure: type[ctypes.Structure]) -> int:
    return (direction << 30) | (ctypes.sizeof(structure) << 16) | (IOC_MAGIC << 8) | number


IOC_VERSION = _ioc(_IOC_READ, 0, VersionStruct)
IOC_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 1, RegisterStruct)
IOC_LOAD = _ioc(_IOC_READ | _IOC_WRITE, 2, LoadStruct)
IOC_SWITCH = _ioc(_IOC_WRITE, 3, SwitchStruct)
IOC_QUERY = _ioc(_IOC_READ | _IOC_WRITE, 4, StateStruct)
IOC_UNREGISTER = _ioc(_IOC_WRITE, 5, UnregisterStruct)
IOC_CACHE = _ioc(_IOC_READ | _IOC_WRITE, 6, CacheStruct)

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


# --- Results and errors ------------------------------------------------------


class KmodError(OSError):
    """An ioctl on /dev/speaker failed. ``errno`` is the kernel's error code."""


class ProgramRejected(KmodError):
    """The module rejected a phase program; ``insn`` is the failing instruction or None."""

    def __init__(self, code: int, message: str, reason: LoadError, insn: int | None) -> None:
        super().__init__(code, message)
        self.reason = reason
        self.insn = insn


class StopSignalSeen(KmodError):
    """The stop signal already moved the container to shutdown, so the module rejected a switch to another phase."""


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """Result of SPEAKER_IOC_VERSION."""

    abi_version: int
    max_groups: int
    groups: int
    retired: int


@dataclasses.dataclass(frozen=True)
class GroupState:
    """Result of SPEAKER_IOC_QUERY for one registered container."""

    id: int
    pid: int
    phase: KmodPhase
    loaded: frozenset[KmodPhase]
    stop_signal: int
    alive: bool
    stop_seen: bool
    filter_refs: int
    filter_users: int
    filter_depth: int
    switches: int
    switch_ns: int


@dataclasses.dataclass(frozen=True)
class ActionCache:
    """Syscall numbers that seccomp allows without running any program, per architecture."""

    native: frozenset[int]
    compat: frozenset[int]


def _bits(words: ctypes.Array[ctypes.c_uint64], count: int) -> frozenset[int]:
    return frozenset(number for number in range(count) if words[number // 64] >> (number % 64) & 1)


class KmodDevice:
    """An open /dev/speaker. Needs root (the node is mode 0600) and CAP_SYS_ADMIN."""

    def __init__(self, path: str | os.PathLike[str] = DEVICE) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KmodError(
                errno.ENOENT,
                f"{self.path} not found: load the module first (insmod kmod/speaker.ko, see docs/kmod.md)",
            ) from None
        except PermissionError as exc:
            raise KmodError(exc.errno, f"cannot open {self.path}: run as root") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KmodDevice:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    def _call(self, request: int, argument: ctypes.Structure, action: str) -> None:
        if _ioctl(self._fd, request, ctypes.addressof(argument)) < 0:
            code = ctypes.get_errno()
            raise KmodError(code, f"{action} failed: {_explain(code)}")

    def version(self) -> ModuleInfo:
        """Return the module's ABI version and how many containers are registered."""
        result = VersionStruct()
        self._call(IOC_VERSION, result, "SPEAKER_IOC_VERSION")
        return ModuleInfo(result.abi_version, result.max_groups, result.groups, result.retired)

    def register(self, pid: int, stop_signal: int = 0, *, newest: bool = False, adopt: bool = False) -> int:
        """Register the container whose init process is ``pid`` and return its id.

        By default the module takes the oldest seccomp filter of ``pid`` that
        its parent does not have, which is the filter the container runtime
        installed. ``newest`` takes the filter ``pid`` uses now instead.
        ``stop_signal`` (0 for none) switches the container to shutdown in the
        kernel as soon as it is sent to the init process. With ``adopt``, a
        filter that is registered already returns the existing id (keeping its
        stop signal and programs) instead of failing with EBUSY.

        A filter that was unregistered while its container kept running comes
        back with a new id and the programs it had, including the runtime's
        original program.
        """
        flags = 0
        if newest:
            flags |= REGISTER_NEWEST
        if adopt:
            flags |= REGISTER_ADOPT
        request = RegisterStruct(abi_version=ABI_VERSION, pid=pid, stop_signal=stop_signal, flags=flags)
        if _ioctl(self._fd, IOC_REGISTER, ctypes.addressof(request)) < 0:
            code = ctypes.get_errno()
            raise KmodError(code, f"registering pid {pid} failed: {_explain_register(code, pid)}")
        return int(request.id)

    def load(self, group: int, phase: Phase | KmodPhase, bpf: bytes) -> None:
        """Give ``phase`` of a registered container a new program, raw struct sock_filter bytes.

        The program takes effect at once if the phase is in force.
        """
        kmod_phase = KmodPhase.of(phase)
        if kmod_phase is KmodPhase.ORIGINAL:
            raise ValueError("the original program cannot be replaced; load booting, running or shutdown")
        if len(bpf) % INSN_SIZE != 0:
            raise ValueError(f"a BPF program is a multiple of {INSN_SIZE} bytes, got {len(bpf)} bytes")
        buffer = ctypes.create_string_buffer(bytes(bpf), max(len(bpf), 1))
        request = LoadStruct(
            id=group,
            phase=kmod_phase,
            len=len(bpf) // INSN_SIZE,
            filter=ctypes.addressof(buffer),
            error_insn=NO_INSN,
        )
        if _ioctl(self._fd, IOC_LOAD, ctypes.addressof(request)) >= 0:
            return
        code = ctypes.get_errno()
        action = f"loading the {kmod_phase.name.lower()} program of container {group}"
        if code in (errno.EINVAL, errno.E2BIG, errno.EAGAIN) and request.error_reason:
            reason = LoadError(request.error_reason)
            insn = None if request.error_insn == NO_INSN else int(request.error_insn)
            where = f"instruction {insn}: " if insn is not None else ""
            raise ProgramRejected(code, f"{action} failed: {where}{reason.description}", reason, insn)
        raise KmodError(code, f"{action} failed: {_explain(code)}")

    def switch(self, group: int, phase: Phase | KmodPhase, *, force: bool = False) -> None:
        """Put the program of ``phase`` in force for every task of a registered container.

        Raises StopSignalSeen when the stop signal already switched the
        container to shutdown, unless ``force`` is set.
        """
        kmod_phase = KmodPhase.of(phase)
        request = SwitchStruct(id=group, phase=kmod_phase, flags=SWITCH_FORCE if force else 0)
        if _ioctl(self._fd, IOC_SWITCH, ctypes.addressof(request)) >= 0:
            return
        code = ctypes.get_errno()
        action = f"switching container {group} to {kmod_phase.name.lower()}"
        if code == errno.EALREADY:
            raise StopSignalSeen(code, f"{action} rejected: the stop signal already switched it to shutdown")
        if code == errno.ENODATA:
            raise KmodError(code, f"{action} failed: no {kmod_phase.name.lower()} program is loaded")
        raise KmodError(code, f"{action} failed: {_explain(code)}")

    def query(self, group: int) -> GroupState:
        """Return the state of a registered container."""
        result = StateStruct(id=group)
        self._call(IOC_QUERY, result, f"querying container {group}")
        return GroupState(
            id=int(result.id),
            pid=int(result.pid),
            phase=KmodPhase(result.phase),
            loaded=frozenset(phase for phase in KmodPhase if result.loaded & (1 << phase)),
            stop_signal=int(result.stop_signal),
            alive=bool(result.flags & STATE_ALIVE),
            stop_seen=bool(result.flags & STATE_STOP_SEEN),
            filter_refs=int(result.filter_refs),
            filter_users=int(result.filter_users),
            filter_depth=int(result.filter_depth),
            switches=int(result.switches),
            switch_ns=int(result.switch_ns),
        )

    def cache(self, group: int) -> ActionCache:
        """Return the action cache of a registered container's filter as seccomp uses it now."""
        result = CacheStruct(id=group)
        self._call(IOC_CACHE, result, f"reading the action cache of container {group}")
        return ActionCache(native=_bits(result.native, result.native_bits), compat=_bits(result.compat, result.compat_bits))

    def unregister(self, group: int, *, restore: bool = False) -> None:
        """Forget a container. Its current program stays in force unless ``restore`` puts the runtime's back."""
        request = UnregisterStruct(id=group, flags=UNREGISTER_RESTORE if restore else 0)
        self._call(IOC_UNREGISTER, request, f"unregistering container {group}")


def _explain(code: int) -> str:
    explanations = {
        errno.EPERM: "CAP_SYS_ADMIN is required",
        errno.ENOENT: "no container is registered with that id",
        errno.ENOTTY: "the module does not know this ioctl; rebuild speaker.ko from this checkout",
        errno.EFAULT: "the module could not read or write the request",
        errno.ENOSPC: "the phase in force was replaced too often; unregister and register again",
        errno.ENOMEM: "the kernel is out of memory",
    }
    return explanations.get(code, os.strerror(code))


def _explain_register(code: int, pid: int) -> str:
    explanations = {
        errno.ESRCH: f"no process with pid {pid}",
        errno.ENODATA: (
            f"process {pid} has no seccomp filter of its own; start the container with a seccomp profile"
        ),
        errno.EBUSY: f"the seccomp filter of process {pid} is already registered",
        errno.ENOSPC: "max_groups containers are registered already; raise the max_groups module parameter",
        errno.EPROTO: f"the module speaks another ABI version than {ABI_VERSION}; rebuild speaker.ko from this checkout",
        errno.ENOEXEC: "the filter does not match the module's struct seccomp_filter layout; see the kernel log",
        errno.EINVAL: "invalid pid or stop signal",
        errno.EAGAIN: "the filter is being unregistered right now; try again",
    }
    return explanations.get(code) or _explain(code)
