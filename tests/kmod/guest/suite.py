"""Kernel module tests that run as root inside the qemu guest (see tests/kmod/stage.py).

Usage: python suite.py WORKDIR [TEST ...]

WORKDIR contains speaker.ko, the helper programs (spk_group, spk_fuzz), the
compiled filters and manifest.json with the probe results each filter must
give. Each test prints "ok NAME (SECONDS s)" or "FAIL NAME: REASON", and the
run ends with "N passed, N failed". The exit status is 0 only if every test
passed.

Every module of this file is imported at the top: tests/kmod/image.py puts
into the guest only the modules that the top-level imports load.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio

# The pipeline tests load these by type name.
import speaker.sinks.count  # noqa: F401
import speaker.sinks.kmod  # noqa: F401
import speaker.stages.enforce  # noqa: F401
from speaker import kmod_io
from speaker.component import Output, Source
from speaker.config import load_pipeline
from speaker.engine import ExitCode, run_pipeline
from speaker.events import CompiledFilter, ContainerAction, ContainerEvent, Event, Phase, PhaseChange, event_from_dict
from speaker.options import option
from speaker.kmod_io import KmodDevice, KmodError, KmodPhase, LoadError, ProgramRejected, StopSignalSeen

DEVICE = "/dev/speaker"
#: ioctl calls of the fuzz test: enough that random requests reach every
#: ioctl's checks thousands of times, and within 25 s under TCG.
FUZZ_CALLS = 100_000
#: Phase switches in the stress test, while every member runs syscalls in a loop.
STRESS_SWITCHES = 2000
#: Maximum time for a helper program to reply to one command under TCG.
ANSWER_TIMEOUT = 60.0

# Classic BPF opcodes (linux/bpf_common.h).
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06
BPF_W, BPF_B = 0x00, 0x10
BPF_ABS, BPF_MEM = 0x20, 0x60
BPF_DIV, BPF_LSH = 0x30, 0x60
BPF_JA, BPF_JEQ = 0x00, 0x10
BPF_K = 0x00
RET_ALLOW = 0x7FFF0000


class TestFailure(AssertionError):
    """A check inside the guest failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise TestFailure(message)


def insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


RET = insn(BPF_RET | BPF_K, RET_ALLOW)


class LineReader:
    """Reads lines from a pipe with a timeout."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.buffer = b""

    def readline(self, timeout: float = ANSWER_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestFailure(f"{self.name} gave no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise TestFailure(f"{self.name} closed its output; buffered: {self.buffer!r}")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


class Group:
    """A running spk_group: a process tree under one seccomp filter."""

    def __init__(self, suite: Suite, filter_name: str, processes: int, threads: int, stack: tuple[int, str] | None = None):
        self.suite = suite
        self.members = processes * threads
        self.threads = threads
        args = [str(suite.workdir / "spk_group"), suite.filter_path(filter_name), str(processes), str(threads)]
        if stack is not None:
            args += [str(stack[0]), suite.filter_path(stack[1])]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        self.reader = LineReader(self.process.stdout.fileno(), f"spk_group {filter_name}")
        ready = self.reader.readline()
        check(ready == f"ready {self.process.pid}", f"spk_group did not start: {ready!r}")
        self.pid = self.process.pid
        suite.groups.append(self)

    def send(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return self.reader.readline()

    def probe(self) -> list[str]:
        words = self.send("probe").split()
        check(words[:1] == ["probe"] and len(words) == self.members + 1, f"bad probe answer {words!r}")
        return words[1:]

    def expect(self, expected: str | list[str], context: str) -> None:
        results = self.probe()
        per_member = [expected] * self.members if isinstance(expected, str) else expected
        for member, (got, want) in enumerate(zip(results, per_member)):
            check(got == want, f"{context}: member {member} got {got}, expected {want} ({self.suite.explain(got, want)})")

    def child_pids(self) -> list[int]:
        """Return the pids of the leader's child processes."""
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:
                children.append(int(entry))
        return sorted(children)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                answer = self.send("exit")
                check(answer == "bye", f"spk_group did not exit cleanly: {answer!r}")
            except (TestFailure, BrokenPipeError):
                self.process.kill()
            self.process.wait(timeout=ANSWER_TIMEOUT)
        if self in self.suite.groups:
            self.suite.groups.remove(self)


class Suite:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.manifest = json.loads((workdir / "manifest.json").read_text())
        self.expected: dict[str, str] = self.manifest["expected"]
        self.expected_stacked: dict[str, str] = self.manifest["expected_stacked"]
        self.groups: list[Group] = []
        self.device: KmodDevice | None = None

    def filter_path(self, name: str) -> str:
        return str(self.workdir / self.manifest["filters"][name]["file"])

    def program(self, name: str) -> bytes:
        return Path(self.filter_path(name)).read_bytes()

    def explain(self, got: str, want: str) -> str:
        labels = self.manifest["probes"]
        outcomes = {"D": f"denied with errno {self.manifest['deny_errno']}", "E": "denied with EPERM", "A": "allowed"}
        wrong = [f"{labels[i]} {outcomes.get(got[i], got[i])}" for i in range(len(want)) if got[i] != want[i]]
        return ", ".join(wrong) or "same"

    @property
    def dev(self) -> KmodDevice:
        if self.device is None:
            self.device = KmodDevice(DEVICE)
        return self.device

    def close_device(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None

    def registered(self, group: Group, stop_signal: int = signal.SIGTERM, phases: bool = True, **flags: bool) -> int:
        """Register a group and load the booting, running and shutdown test filters."""
        group_id = self.dev.register(group.pid, stop_signal, **flags)
        if phases:
            for phase in (Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN):
                self.dev.load(group_id, phase, self.program(str(phase)))
        return group_id

    def cleanup(self) -> None:
        for group in list(self.groups):
            group.close()


TESTS: list[tuple[str, Callable[[Suite], None]]] = []


def test(function: Callable[[Suite], None]) -> Callable[[Suite], None]:
    TESTS.append((function.__name__.removeprefix("test_"), function))
    return function


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def expect_errno(code: int, action: Callable[[], object], context: str) -> OSError:
    try:
        action()
    except OSError as exc:
        check(exc.errno == code, f"{context}: expected {errno.errorcode[code]}, got {exc!r}")
        return exc
    raise TestFailure(f"{context}: expected {errno.errorcode[code]}, but the call succeeded")


def raw_ioctl(device: KmodDevice, request: int, argument: ctypes.Structure | int) -> int:
    """Call ioctl with a structure (by address) or a plain address, and return 0 or the errno."""
    address = argument if isinstance(argument, int) else ctypes.addressof(argument)
    if kmod_io._ioctl(device.fileno(), request, address) < 0:
        return ctypes.get_errno()
    return 0


def in_child(body: Callable[[], int]) -> int:
    """Run body in a forked child and return its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
            code = 99
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --- Device and permissions -------------------------------------------------------


@test
def test_device_node(suite: Suite) -> None:
    info = os.stat(DEVICE)
    check(stat.S_ISCHR(info.st_mode), f"{DEVICE} is not a character device")
    check(stat.S_IMODE(info.st_mode) == 0o600, f"{DEVICE} has mode {stat.S_IMODE(info.st_mode):o}, expected 600")
    check(info.st_uid == 0 and info.st_gid == 0, f"{DEVICE} belongs to {info.st_uid}:{info.st_gid}, expected root")
    version = suite.dev.version()
    check(version.abi_version == kmod_io.ABI_VERSION, f"module ABI {version.abi_version}, library {kmod_io.ABI_VERSION}")
    check(version.groups == 0 and version.retired == 0, f"fresh module holds groups: {version}")


@test
def test_device_needs_root(suite: Suite) -> None:
    def open_as_nobody() -> int:
        os.setgid(65534)
        os.setuid(65534)
        try:
            os.open(DEVICE, os.O_RDWR)
        except PermissionError:
            return 0
        return 1

    check(in_child(open_as_nobody) == 0, "user nobody could open /dev/speaker")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


@test
def test_ioctl_needs_cap_sys_admin(suite: Suite) -> None:
    device = suite.dev
    cap_sys_admin = 21

    def ioctl_without_cap() -> int:
        if raw_ioctl(device, kmod_io.IOC_VERSION, kmod_io.VersionStruct()) != 0:
            return 2
        libc = ctypes.CDLL(None, use_errno=True)
        header = _CapHeader(0x20080522, 0)
        data = (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return 3
        data[0].effective &= ~(1 << cap_sys_admin)
        if libc.capset(ctypes.byref(header), data) != 0:
            return 4
        return 0 if raw_ioctl(device, kmod_io.IOC_VERSION, kmod_io.VersionStruct()) == errno.EPERM else 1

    status = in_child(ioctl_without_cap)
    check(status == 0, f"ioctl without CAP_SYS_ADMIN: child status {status} (1: not EPERM, 2: failed with it)")


# --- Registration and loading -------------------------------------------------------


@test
def test_register_rejects_bad_requests(suite: Suite) -> None:
    device = suite.dev
    expect_errno(errno.ESRCH, lambda: device.register(999_999), "nonexistent pid")
    sleeper = subprocess.Popen(["/bin/sleep", "60"])
    try:
        expect_errno(errno.ENODATA, lambda: device.register(sleeper.pid), "process without a filter")
    finally:
        sleeper.kill()
        sleeper.wait()

    request = kmod_io.RegisterStruct(abi_version=2, pid=os.getpid())
    check(raw_ioctl(device, kmod_io.IOC_REGISTER, request) == errno.EPROTO, "ABI version 2 was not rejected with EPROTO")
    for field, value in (("flags", 1 << 5), ("pid", 0), ("stop_signal", 65)):
        request = kmod_io.RegisterStruct(abi_version=1, pid=os.getpid())
        setattr(request, field, value)
        check(raw_ioctl(device, kmod_io.IOC_REGISTER, request) == errno.EINVAL, f"{field}={value} was not rejected")
    check(raw_ioctl(device, kmod_io.IOC_REGISTER, 16) == errno.EFAULT, "a bad request pointer was not rejected")
    check(raw_ioctl(device, 0xB9FF, 0) == errno.ENOTTY, "an unknown ioctl was not rejected with ENOTTY")
    expect_errno(errno.ENOENT, lambda: device.query(987654), "unknown id")

    group = Group(suite, "original", 2, 1)
    group_id = device.register(group.pid)
    expect_errno(errno.EBUSY, lambda: device.register(group.pid), "second registration")
    expect_errno(errno.EBUSY, lambda: device.register(group.pid, newest=True), "second registration of the newest filter")
    check(device.register(group.pid, adopt=True) == group_id, "adopting did not return the registered id")
    # The child process inherited every filter from the leader, its parent.
    child = group.child_pids()
    check(len(child) == 1, f"expected one child process, found {child}")
    expect_errno(errno.ENODATA, lambda: device.register(child[0]), "process whose filters are all inherited")
    device.unregister(group_id)
    group.close()


def rejected(device: KmodDevice, group_id: int, program: bytes, phase: Phase = Phase.BOOTING) -> ProgramRejected:
    try:
        device.load(group_id, phase, program)
    except ProgramRejected as exc:
        return exc
    raise TestFailure(f"program {program.hex()} was accepted")


@test
def test_load_rejects_bad_programs(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 1, 1)
    group_id = device.register(group.pid)
    ld_abs = BPF_LD | BPF_W | BPF_ABS
    cases = [
        ("empty program", b"", LoadError.LENGTH, None),
        ("4097 instructions", RET * 4097, LoadError.LENGTH, None),
        ("byte load", insn(BPF_LD | BPF_B | BPF_ABS) + RET, LoadError.OPCODE, 0),
        ("jump past the end", insn(BPF_JMP | BPF_JA, 5) + RET, LoadError.JUMP, 0),
        ("false branch past the end", insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 3) + RET, LoadError.JUMP, 0),
        ("no return at the end", RET + insn(ld_abs, 0), LoadError.NO_RET, 1),
        ("unaligned load", insn(ld_abs, 2) + RET, LoadError.OFFSET, 0),
        ("load past seccomp_data", insn(ld_abs, 64) + RET, LoadError.OFFSET, 0),
        ("scratch slot 16", insn(BPF_LD | BPF_MEM, 16) + RET, LoadError.MEM_INDEX, 0),
        ("slot never stored", insn(BPF_LD | BPF_MEM, 3) + RET, LoadError.MEM_UNINIT, 0),
        (
            "slot stored on one path only",
            insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1) + insn(BPF_ST, 3) + insn(BPF_LD | BPF_MEM, 3) + RET,
            LoadError.MEM_UNINIT,
            2,
        ),
        ("division by 0", insn(BPF_ALU | BPF_DIV | BPF_K, 0) + RET, LoadError.DIV_ZERO, 0),
        ("shift by 32", insn(BPF_ALU | BPF_LSH | BPF_K, 32) + RET, LoadError.SHIFT, 0),
    ]
    for case, program, reason, bad in cases:
        error = rejected(device, group_id, program)
        check(error.errno == errno.EINVAL, f"{case}: errno {error.errno}, expected EINVAL")
        check(error.reason is reason, f"{case}: reason {error.reason.name}, expected {reason.name}")
        check(error.insn == bad, f"{case}: instruction {error.insn}, expected {bad}")

    # A slot stored on every path may be loaded.
    device.load(group_id, Phase.SHUTDOWN, insn(BPF_ST, 3) + insn(BPF_LD | BPF_MEM, 3) + RET)

    request = kmod_io.LoadStruct(id=group_id, phase=KmodPhase.BOOTING, len=1, filter=16)
    check(raw_ioctl(device, kmod_io.IOC_LOAD, request) == errno.EFAULT, "a bad program pointer was not rejected")
    program = ctypes.create_string_buffer(RET)
    request = kmod_io.LoadStruct(id=group_id, phase=KmodPhase.ORIGINAL, len=1, filter=ctypes.addressof(program))
    check(raw_ioctl(device, kmod_io.IOC_LOAD, request) == errno.EINVAL, "loading the original phase was not rejected")
    expect_errno(errno.ENOENT, lambda: device.load(group_id + 100, Phase.BOOTING, RET), "unknown id")

    state = device.query(group_id)
    check(state.phase is KmodPhase.ORIGINAL, f"rejected loads changed the phase to {state.phase.name}")
    check(state.loaded == {KmodPhase.ORIGINAL, KmodPhase.SHUTDOWN}, f"loaded phases are {sorted(state.loaded)}")
    group.expect(suite.expected["original"], "after rejected loads")
    device.unregister(group_id)
    group.close()


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install_filters(programs: list[bytes]) -> Callable[[], int]:
    """Return a child body that installs each program with seccomp(2), reports on fd 1, and waits for stdin to close."""

    def body() -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return 3
        for program in programs:
            buffer = ctypes.create_string_buffer(program, len(program))
            fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
            if libc.syscall(317, 1, 0, ctypes.byref(fprog)) != 0:  # seccomp(SECCOMP_SET_MODE_FILTER)
                return 4
        os.write(1, b"installed\n")
        os.read(0, 1)
        return 0

    return body


@test
def test_load_limits(suite: Suite) -> None:
    device = suite.dev
    longest = insn(BPF_LD | BPF_W | BPF_ABS, 0) * 4095 + RET
    group = Group(suite, "original", 1, 1)
    group_id = device.register(group.pid)
    device.load(group_id, Phase.RUNNING, longest)
    device.switch(group_id, Phase.RUNNING)
    group.expect("A" * len(suite.manifest["probes"]), "a 4096-instruction program that allows everything")
    device.unregister(group_id)
    group.close()

    # Seven filters of 4096 instructions and a one-instruction filter on top
    # fit seccomp's 32768 instructions per path; a 4096-instruction top does not.
    reader, writer = os.pipe()
    control_read, control_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(writer, 1)
        os.dup2(control_read, 0)
        for unused in (reader, writer, control_read, control_write):
            os.close(unused)
        os._exit(install_filters([longest] * 7 + [RET])())
    os.close(writer)
    os.close(control_read)
    try:
        answer = LineReader(reader, "filter stacker").readline()
        check(answer == "installed", f"installing eight filters failed: {answer!r}")
        stacked_id = device.register(pid, newest=True)
        check(device.query(stacked_id).filter_depth == 8, "the newest of eight filters is not at depth 8")
        error = rejected(device, stacked_id, longest)
        check(error.reason is LoadError.PATH_LENGTH, f"path length: reason {error.reason.name}")
        device.load(stacked_id, Phase.RUNNING, RET * 2)
        device.unregister(stacked_id)
    finally:
        os.close(control_write)
        os.waitpid(pid, 0)


# --- Phases ----------------------------------------------------------------------------


@test
def test_phases_switch_every_task(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 4, 3)
    group_id = suite.registered(group)
    state = device.query(group_id)
    check(state.phase is KmodPhase.ORIGINAL, f"new registration is in phase {state.phase.name}")
    # 12 tasks use the filter directly; the module holds one more reference.
    check(state.filter_users == 12, f"filter users {state.filter_users}, expected 12 tasks")
    check(state.filter_refs == 13, f"filter references {state.filter_refs}, expected 12 tasks + the module")
    check(state.filter_depth == 1, f"filter depth {state.filter_depth}, expected 1")
    group.expect(suite.expected["original"], "runtime's program")

    for count, phase in enumerate((Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN), start=1):
        device.switch(group_id, phase)
        group.expect(suite.expected[str(phase)], f"after switching to {phase}")
        state = device.query(group_id)
        check(state.phase is KmodPhase.of(phase), f"module reports {state.phase.name} after switching to {phase}")
        check(state.switches == count, f"{state.switches} swaps after {count} switches")
    device.switch(group_id, KmodPhase.ORIGINAL)
    group.expect(suite.expected["original"], "after switching back to the runtime's program")
    device.unregister(group_id)
    group.close()


@test
def test_action_cache_denies_after_switch(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 2, 2)
    group_id = suite.registered(group)
    device.switch(group_id, Phase.BOOTING)
    results = group.probe()
    check(all(result[0] == "A" for result in results), f"sysinfo must be allowed in booting: {results}")
    # Booting allows sysinfo whatever its arguments, so the kernel's action
    # cache allows it without running any program. Running denies it.
    device.switch(group_id, Phase.RUNNING)
    results = group.probe()
    for member, result in enumerate(results):
        check(result[0] == "D", f"member {member}: sysinfo still allowed after the switch to running ({result})")
        check(result[7] == "D", f"member {member}: x86 sysinfo still allowed after the switch to running ({result})")
        check(result[1] == "A", f"member {member}: times still denied after the switch to running ({result})")
    device.unregister(group_id)
    group.close()


@test
def test_cache_matches_kernel(suite: Suite) -> None:
    device = suite.dev
    for original, name in (
        ("original", "booting"),
        ("original", "running"),
        ("original", "shutdown"),
        ("profile_union", "profile_running"),
        ("profile_union", "profile_shutdown"),
    ):
        # The kernel computes the cache of a filter installed with seccomp(2).
        installed = Group(suite, name, 1, 1)
        installed_id = device.register(installed.pid)
        kernel = device.cache(installed_id)
        device.unregister(installed_id)
        installed.close()

        swapped = Group(suite, original, 1, 1)
        swapped_id = device.register(swapped.pid)
        before = device.cache(swapped_id)
        phase = Phase(name.removeprefix("profile_"))
        device.load(swapped_id, phase, suite.program(name))
        device.switch(swapped_id, phase)
        module = device.cache(swapped_id)
        check(module.native == kernel.native, f"{name}: x86_64 cache differs: only module {sorted(module.native - kernel.native)}, only kernel {sorted(kernel.native - module.native)}")
        check(module.compat == kernel.compat, f"{name}: i386 cache differs: only module {sorted(module.compat - kernel.compat)}, only kernel {sorted(kernel.compat - module.compat)}")
        check(len(kernel.native) > 300, f"{name}: the kernel caches only {len(kernel.native)} x86_64 syscalls")
        device.switch(swapped_id, KmodPhase.ORIGINAL)
        check(device.cache(swapped_id) == before, f"{name}: switching back did not restore the runtime program's cache")
        device.unregister(swapped_id)
        swapped.close()


@test
def test_two_groups_independent(suite: Suite) -> None:
    device = suite.dev
    first = Group(suite, "original", 2, 2)
    second = Group(suite, "original", 3, 1)
    first_id = suite.registered(first)
    second_id = suite.registered(second, stop_signal=signal.SIGUSR1)
    check(first_id != second_id, "two groups got the same id")
    check(device.version().groups == 2, f"module holds {device.version().groups} groups, expected 2")
    device.switch(first_id, Phase.RUNNING)
    device.switch(second_id, Phase.BOOTING)
    first.expect(suite.expected["running"], "first group")
    second.expect(suite.expected["booting"], "second group")
    device.switch(second_id, Phase.SHUTDOWN)
    first.expect(suite.expected["running"], "first group after the second switched")
    second.expect(suite.expected["shutdown"], "second group")
    # Each group's stop signal only moves that group.
    os.kill(second.pid, signal.SIGTERM)
    check(second.reader.readline().startswith("signal 15 "), "second group did not handle SIGTERM")
    os.kill(first.pid, signal.SIGUSR1)
    line = first.reader.readline()
    check(line == f"signal 10 {suite.expected['running']}", f"SIGUSR1 changed the first group's phase: {line!r}")
    check(device.query(first_id).phase is KmodPhase.RUNNING, "first group left running")
    device.unregister(first_id)
    device.unregister(second_id)
    first.close()
    second.close()


@test
def test_stop_signal_switches_to_shutdown(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 2, 2)
    group_id = suite.registered(group, stop_signal=signal.SIGTERM)
    device.switch(group_id, Phase.RUNNING)

    os.kill(group.pid, signal.SIGUSR1)
    line = group.reader.readline()
    check(line == f"signal 10 {suite.expected['running']}", f"another signal changed the phase: {line!r}")
    child = group.child_pids()[0]
    os.kill(child, signal.SIGTERM)
    time.sleep(0.2)
    check(device.query(group_id).phase is KmodPhase.RUNNING, "SIGTERM to a non-init process switched the group")

    os.kill(group.pid, signal.SIGTERM)
    line = group.reader.readline()
    check(
        line == f"signal 15 {suite.expected['shutdown']}",
        f"the SIGTERM handler did not run under the shutdown program: {line!r}, expected {suite.expected['shutdown']}",
    )
    state = device.query(group_id)
    check(state.phase is KmodPhase.SHUTDOWN and state.stop_seen, f"after SIGTERM: {state}")
    group.expect(suite.expected["shutdown"], "every member after SIGTERM")

    try:
        device.switch(group_id, Phase.RUNNING)
    except StopSignalSeen:
        pass
    else:
        raise TestFailure("a switch away from shutdown after the stop signal was not refused")
    device.switch(group_id, Phase.SHUTDOWN)
    device.switch(group_id, Phase.RUNNING, force=True)
    group.expect(suite.expected["running"], "after a forced switch")
    device.unregister(group_id)
    group.close()

    quiet = Group(suite, "original", 1, 1)
    quiet_id = suite.registered(quiet, stop_signal=0)
    device.switch(quiet_id, Phase.RUNNING)
    os.kill(quiet.pid, signal.SIGTERM)
    line = quiet.reader.readline()
    check(line == f"signal 15 {suite.expected['running']}", f"SIGTERM switched a group without stop signal: {line!r}")
    device.unregister(quiet_id)
    quiet.close()


def expect_settled(group: Group, expected: str | list[str], context: str, timeout: float = 5.0) -> None:
    """Probe until the results match, for up to ``timeout`` seconds, for changes that another thread or a work item makes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            group.expect(expected, context)
            return
        except TestFailure:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@test
def test_stacked_filters_narrowed(suite: Suite) -> None:
    device = suite.dev
    # Member 2 starts the second process and stacks a filter that its two threads share.
    group = Group(suite, "original", 2, 2, stack=(2, "stacked"))
    group_id = suite.registered(group)
    check(device.query(group_id).filter_depth == 1, "registered a stacked filter instead of the runtime's")
    for phase in ("booting", "running", "shutdown"):
        device.switch(group_id, Phase(phase))
        per_member = [suite.expected[phase]] * 2 + [suite.expected_stacked[phase]] * 2
        group.expect(per_member, f"{phase} with a stacked filter")
    device.switch(group_id, Phase.BOOTING)
    device.switch(group_id, Phase.RUNNING)
    os.kill(group.pid, signal.SIGTERM)
    group.reader.readline()
    expect_settled(group, [suite.expected["shutdown"]] * 2 + [suite.expected_stacked["shutdown"]] * 2, "after SIGTERM")
    device.unregister(group_id)
    group.close()


@test
def test_register_picks_runtime_filter(suite: Suite) -> None:
    device = suite.dev
    # The leader's main thread stacks a filter after its second thread started.
    group = Group(suite, "original", 1, 2, stack=(0, "stacked"))
    group_id = device.register(group.pid)
    state = device.query(group_id)
    check(state.filter_depth == 1, f"default registration took a filter at depth {state.filter_depth}, expected 1")
    # Used by the second thread and by the stacked filter; referenced by both and the module.
    check(state.filter_users == 2 and state.filter_refs == 3, f"runtime filter counts: {state}")
    device.unregister(group_id)
    newest_id = device.register(group.pid, newest=True)
    state = device.query(newest_id)
    check(state.filter_depth == 2, f"newest registration took a filter at depth {state.filter_depth}, expected 2")
    check(state.filter_users == 1 and state.filter_refs == 2, f"stacked filter counts: {state}")
    device.unregister(newest_id)
    group.close()


@test
def test_unregister_keeps_or_restores(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 2, 1)
    group_id = suite.registered(group)
    device.switch(group_id, Phase.RUNNING)
    device.unregister(group_id)
    group.expect(suite.expected["running"], "after unregistering")
    check(device.version().retired == 1, f"retired count {device.version().retired}, expected 1")

    # Registering again brings back the same programs under a new id.
    again = device.register(group.pid)
    check(again != group_id, "the second registration reused the old id")
    state = device.query(again)
    check(state.phase is KmodPhase.RUNNING, f"second registration is in {state.phase.name}, expected RUNNING")
    check(len(state.loaded) == 4, f"second registration has programs for {sorted(state.loaded)}")
    check(device.version().retired == 0, "the revived registration is still counted as retired")
    device.switch(again, Phase.BOOTING)
    group.expect(suite.expected["booting"], "after switching the second registration")
    device.unregister(again, restore=True)
    group.expect(suite.expected["original"], "after unregistering with restore")
    group.close()
    # The next ioctl that reaps finds the container gone and frees its programs.
    device.unregister(suite.registered(Group(suite, "original", 1, 1), phases=False))
    check(device.version().retired == 1, f"retired count {device.version().retired}, expected only the new group")
    suite.cleanup()


@test
def test_exit_while_registered(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 2, 2)
    group_id = suite.registered(group)
    device.switch(group_id, Phase.RUNNING)
    group.close()
    state = device.query(group_id)
    check(not state.alive, "exited group still reported alive")
    check(state.filter_users == 0 and state.filter_refs == 1, f"filter counts after exit: {state}")
    device.unregister(group_id)
    check(device.version().retired == 0, f"exited group not freed: {device.version()}")

    # A group that exits without being unregistered is swept by the next registration.
    forgotten = Group(suite, "original", 1, 1)
    forgotten_id = suite.registered(forgotten)
    forgotten.close()
    other = Group(suite, "original", 1, 1)
    other_id = device.register(other.pid)
    expect_errno(errno.ENOENT, lambda: device.query(forgotten_id), "exited group after the next registration")
    version = device.version()
    check(version.groups == 1 and version.retired == 0, f"after the sweep: {version}")
    device.unregister(other_id)
    other.close()


@test
def test_compiled_profile(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "profile_union", 2, 2)
    group_id = device.register(group.pid, signal.SIGTERM)
    for phase in (Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN):
        device.load(group_id, phase, suite.program(f"profile_{phase}"))
    group.expect(suite.expected["profile_union"], "runtime's union filter")
    for phase in (Phase.BOOTING, Phase.RUNNING):
        device.switch(group_id, phase)
        group.expect(suite.expected[f"profile_{phase}"], f"compiled {phase} filter")
    os.kill(group.pid, signal.SIGTERM)
    line = group.reader.readline()
    check(line == f"signal 15 {suite.expected['profile_shutdown']}", f"compiled shutdown filter in the handler: {line!r}")
    device.unregister(group_id)
    group.close()


@dataclasses.dataclass(frozen=True)
class EventFileOptions:
    path: Path = option(help="File with one event per line, in Event.to_dict form.")


class EventFile(Source):
    """Emit the events of a small JSON lines file; the pipeline test's source."""

    type_name = "kmod_test_events"
    Options = EventFileOptions
    emits = (Event,)

    async def run(self, output: Output) -> None:
        lines = self.options.path.read_text().splitlines()
        await output.send_many(event_from_dict(json.loads(line)) for line in lines if line.strip())


def _pipeline_events(suite: Suite, pid: int) -> list[dict[str, object]]:
    container = "c0ffee" * 4
    events: list[dict[str, object]] = [
        ContainerEvent(container_id=container, action=ContainerAction.START, pid=pid, stop_signal=15).to_dict()
    ]
    for phase in (Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN):
        bpf = suite.program(f"profile_{phase}")
        events.append(
            CompiledFilter(phase=phase, layout="phase", arches=("x86_64", "x86"), default_action="errno:4000", allowed=frozenset(), bpf=bpf).to_dict()
        )
    events.append(CompiledFilter(phase=None, layout="notify", arches=("x86_64",), default_action="kill-process", allowed=frozenset()).to_dict())
    events.append(PhaseChange(container_id=container, phase=Phase.RUNNING, previous=Phase.BOOTING).to_dict())
    return events


@test
def test_kmod_sink_pipeline(suite: Suite) -> None:
    group = Group(suite, "profile_union", 2, 1)
    with tempfile.TemporaryDirectory(prefix="speaker-kmod-") as directory:
        events = Path(directory) / "events.jsonl"
        events.write_text("".join(json.dumps(event) + "\n" for event in _pipeline_events(suite, group.pid)))
        pipeline = Path(directory) / "enforce.toml"
        pipeline.write_text(
            f'[sources.replay]\ntype = "tests.kmod.guest.suite:EventFile"\npath = "{events}"\n\n'
            f'[sinks.kernel]\ntype = "kmod"\ninputs = ["replay"]\ndevice = "{DEVICE}"\non_exit = "stay"\n'
        )
        result = anyio.run(lambda: run_pipeline(load_pipeline(pipeline), handle_signals=False))
    check(result.exit_code == ExitCode.OK, f"pipeline exit code {result.exit_code!r}: {result.failures} {result.problems}")
    group.expect(suite.expected["profile_running"], "after the pipeline switched to running")
    # on_exit = "stay": still registered, so adopting returns the sink's id and the stop signal still works.
    group_id = suite.dev.register(group.pid, adopt=True)
    check(suite.dev.query(group_id).phase is KmodPhase.RUNNING, "the pipeline's registration is not in running")
    os.kill(group.pid, signal.SIGTERM)
    line = group.reader.readline()
    check(line == f"signal 15 {suite.expected['profile_shutdown']}", f"stop signal after the pipeline ended: {line!r}")
    suite.dev.unregister(group_id)
    group.close()


@dataclasses.dataclass(frozen=True)
class EventPipeOptions:
    path: Path = option(help="FIFO to read events from, one Event.to_dict JSON object per line.")


class EventPipe(Source):
    """Emit each event written to a FIFO as soon as its line arrives, until the writer closes it. A test source."""

    type_name = "kmod_test_event_pipe"
    Options = EventPipeOptions
    emits = (Event,)

    async def run(self, output: Output) -> None:
        # Opening a FIFO for reading blocks until the test opens it for writing.
        pipe = await anyio.to_thread.run_sync(lambda: open(self.options.path, "rb"))
        with pipe:
            while line := await anyio.to_thread.run_sync(pipe.readline):
                if line.strip():
                    await output.send(event_from_dict(json.loads(line)))


#: Seconds the enforce stage test gives the pipeline to act on one event under TCG.
PIPELINE_TIMEOUT = 30.0
#: The running margin of the enforce stage test: long enough to probe inside it under TCG.
TEST_MARGIN = 3.0


def enforce_pipeline(directory: Path, fifo: Path, profile: Path, seccomp: Path, errno_value: int) -> Path:
    """Write a pipeline: the FIFO source, the enforce stage with backend "kmod", and a count sink."""
    pipeline = directory / "enforce.toml"
    pipeline.write_text(
        f'[sources.events]\ntype = "tests.kmod.guest.suite:EventPipe"\npath = "{fifo}"\n\n'
        f'[stages.enforce]\ntype = "enforce"\ninputs = ["events"]\nbackend = "kmod"\nprofile = "{profile}"\n'
        f'seccomp_json = "{seccomp}"\ndefault_action = "errno"\nerrno = "{errno_value}"\n'
        f'running_margin = "{TEST_MARGIN:g}s"\ndevice = "{DEVICE}"\n\n'
        '[sinks.count]\ntype = "count"\ninputs = ["enforce"]\n'
    )
    return pipeline


def open_fifo_writer(fifo: Path, runner: threading.Thread) -> int:
    """Open ``fifo`` for writing once the pipeline's source reads it. Raises TestFailure if the pipeline ends first."""
    deadline = time.monotonic() + PIPELINE_TIMEOUT
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        check(runner.is_alive(), "the pipeline ended before its source opened the FIFO")
        check(time.monotonic() < deadline, f"the pipeline's source did not open the FIFO within {PIPELINE_TIMEOUT:.0f} s")
        time.sleep(0.05)


@test
def test_enforce_stage_kmod_backend(suite: Suite) -> None:
    expected = suite.manifest["expected_enforced"]
    # The runtime's filter: the union of the profile's phases, compiled on the host.
    group = Group(suite, "profile_union", 2, 1)
    group.expect(suite.expected["profile_union"], "union filter before the pipeline")
    container = "e0f0" * 16
    results: list[object] = []
    with tempfile.TemporaryDirectory(prefix="speaker-enforce-") as name:
        directory = Path(name)
        fifo = directory / "events"
        os.mkfifo(fifo)
        seccomp = directory / "seccomp.json"
        profile = suite.workdir / suite.manifest["profile"]
        spec = load_pipeline(enforce_pipeline(directory, fifo, profile, seccomp, suite.manifest["deny_errno"]))
        runner = threading.Thread(
            target=lambda: results.append(anyio.run(lambda: run_pipeline(spec, handle_signals=False))), daemon=True
        )
        runner.start()
        writer = os.fdopen(open_fifo_writer(fifo, runner), "w")
        try:

            def send(event: Event) -> None:
                writer.write(json.dumps(event.to_dict()) + "\n")
                writer.flush()

            send(ContainerEvent(container_id=container, action=ContainerAction.START, pid=group.pid, stop_signal=15))
            expect_settled(group, expected["booting"], "booting after the start event", PIPELINE_TIMEOUT)
            group_id = suite.dev.register(group.pid, adopt=True)
            state = suite.dev.query(group_id)
            check(state.phase is KmodPhase.BOOTING and state.stop_signal == 15, f"after the start event: {state}")

            send(PhaseChange(container_id=container, phase=Phase.RUNNING, previous=Phase.BOOTING))
            margin_started = time.monotonic()
            expect_settled(group, expected["margin"], "running margin", PIPELINE_TIMEOUT)
            seen_margin = time.monotonic() - margin_started
            expect_settled(group, expected["running"], "running after the margin", PIPELINE_TIMEOUT)
            margin_seen_for = time.monotonic() - margin_started
            check(seen_margin < TEST_MARGIN, f"the margin program was first seen after {seen_margin:.1f} s")
            # The stage starts the margin after this test has sent the event, and
            # this test timed from the end of the send, so allow a little less.
            check(margin_seen_for >= TEST_MARGIN - 0.5, f"the running program replaced the margin after {margin_seen_for:.1f} s")
            check(suite.dev.query(group_id).phase is KmodPhase.RUNNING, "the module is not in running")

            send(PhaseChange(container_id=container, phase=Phase.SHUTDOWN, previous=Phase.RUNNING))
            expect_settled(group, expected["shutdown"], "shutdown", PIPELINE_TIMEOUT)
            check(suite.dev.version().groups == 1, f"registrations before the die event: {suite.dev.version()}")

            send(ContainerEvent(container_id=container, action=ContainerAction.DIE, pid=group.pid, exit_code=0))
            deadline = time.monotonic() + PIPELINE_TIMEOUT
            while suite.dev.version().groups and time.monotonic() < deadline:
                time.sleep(0.05)
            check(suite.dev.version().groups == 0, f"the die event left registrations: {suite.dev.version()}")
            group.expect(expected["shutdown"], "after unregistering, the current program stays")
        finally:
            writer.close()
            runner.join(timeout=PIPELINE_TIMEOUT)
        check(not runner.is_alive(), "the pipeline did not end after its source closed")
        result = results[0]
        check(getattr(result, "exit_code", None) == ExitCode.OK, f"pipeline result: {result}")

        document = json.loads(seccomp.read_text())
        check("listenerPath" not in document, "the union profile names a listener")
        check(document["defaultAction"] == "SCMP_ACT_ERRNO", f"union default action {document['defaultAction']}")
        allowed = {name for rule in document["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
        check({"sysinfo", "times", "getrusage", "getppid", "getpriority"} <= allowed, "the union profile misses a phase's probe")
        check("uname" not in allowed, "the union profile allows uname, which no phase lists")
    group.close()


# --- Stress, fuzzing and unloading -------------------------------------------------------


@test
def test_switch_stress(suite: Suite) -> None:
    device = suite.dev
    group = Group(suite, "original", 2, 3)
    group_id = suite.registered(group)
    cycle = (Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN, Phase.RUNNING)
    check(group.send("spin") == "spinning", "spk_group did not start spinning")
    started = time.monotonic()
    reloads = 0
    for index in range(STRESS_SWITCHES):
        phase = cycle[index % len(cycle)]
        device.switch(group_id, phase)
        if index % 100 == 99:
            # Replace the program in force while the members run it.
            device.load(group_id, phase, suite.program(str(phase)))
            reloads += 1
    elapsed = time.monotonic() - started
    answer = group.send("calm").split()
    check(answer[0] == "calm" and int(answer[1]) > 0, f"members did not run during the switches: {answer}")
    final = cycle[(STRESS_SWITCHES - 1) % len(cycle)]
    group.expect(suite.expected[str(final)], f"after {STRESS_SWITCHES} switches")
    state = device.query(group_id)
    check(state.switches == STRESS_SWITCHES + reloads, f"{state.switches} swaps, expected {STRESS_SWITCHES + reloads}")
    print(f"  {STRESS_SWITCHES} switches and {reloads} reloads in {elapsed:.1f} s while members ran {answer[1]} probe rounds")
    device.unregister(group_id)
    group.close()


@test
def test_fuzz_ioctls(suite: Suite) -> None:
    group = Group(suite, "original", 2, 2)
    group_id = suite.registered(group)
    check(group.send("spin") == "spinning", "spk_group did not start spinning")
    suite.close_device()
    result = subprocess.run(
        [str(suite.workdir / "spk_fuzz"), DEVICE, str(FUZZ_CALLS), "0x5eed", str(group.pid), str(group_id)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    check(result.returncode == 0, f"spk_fuzz failed with {result.returncode}: {result.stderr}")
    summary = result.stdout.strip()
    check(summary.startswith(f"fuzz calls={FUZZ_CALLS} "), f"unexpected fuzz summary: {summary!r}")
    print(f"  {summary}")
    version = suite.dev.version()
    check(version.abi_version == kmod_io.ABI_VERSION, "the module stopped answering after the fuzz run")
    group.process.kill()
    group.process.wait()
    suite.groups.remove(group)
    # The fuzzer may have left registrations behind: the next registration sweeps the dead ones.
    probe = Group(suite, "original", 1, 1)
    probe_id = suite.registered(probe)
    device = suite.dev
    device.switch(probe_id, Phase.RUNNING)
    probe.expect(suite.expected["running"], "a new group after the fuzz run")
    check(device.version().groups == 1, f"groups left after the fuzz run: {device.version()}")
    device.unregister(probe_id)
    probe.close()


@test
def test_unload_with_groups_registered(suite: Suite) -> None:
    device = suite.dev
    first = Group(suite, "original", 2, 2)
    second = Group(suite, "original", 1, 2)
    first_id = suite.registered(first)
    second_id = suite.registered(second)
    device.switch(first_id, Phase.RUNNING)
    device.switch(second_id, Phase.BOOTING)
    busy = run_command("rmmod", "speaker")
    check(busy.returncode != 0, "rmmod succeeded while /dev/speaker was open")
    suite.close_device()
    unloaded = run_command("rmmod", "speaker")
    check(unloaded.returncode == 0, f"rmmod failed: {unloaded.stderr}")
    check(not os.path.exists(DEVICE), f"{DEVICE} still exists after rmmod")
    first.expect(suite.expected["running"], "first group after unloading")
    second.expect(suite.expected["booting"], "second group after unloading")
    os.kill(first.pid, signal.SIGTERM)
    line = first.reader.readline()
    check(line == f"signal 15 {suite.expected['running']}", f"unloaded module still reacted to SIGTERM: {line!r}")
    first.close()
    second.close()

    loaded = run_command("insmod", str(suite.workdir / "speaker.ko"))
    check(loaded.returncode == 0, f"loading the module again failed: {loaded.stderr}")
    group = Group(suite, "original", 1, 1)
    group_id = suite.registered(group)
    device = suite.dev
    device.switch(group_id, Phase.SHUTDOWN)
    group.expect(suite.expected["shutdown"], "a group after reloading the module")
    device.unregister(group_id)
    group.close()


@test
def test_unknown_layout_refused(suite: Suite) -> None:
    suite.close_device()
    unloaded = run_command("rmmod", "speaker")
    check(unloaded.returncode == 0, f"rmmod failed: {unloaded.stderr}")
    try:
        # The same sources, with a layout table that lists no real kernel release.
        attempt = run_command("insmod", str(suite.workdir / "speaker-unknown-layout.ko"))
        check(attempt.returncode != 0, "a module without a layout for this kernel loaded")
        check(not os.path.exists(DEVICE), f"{DEVICE} appeared although the module refused to load")
        log = run_command("dmesg").stdout
        check("no verified struct seccomp_filter layout for kernel" in log, "the kernel log does not say why the module refused to load")
    finally:
        loaded = run_command("insmod", str(suite.workdir / "speaker.ko"))
    check(loaded.returncode == 0, f"loading the module again failed: {loaded.stderr}")


def selected(names: list[str]) -> Iterator[tuple[str, Callable[[Suite], None]]]:
    unknown = set(names) - {name for name, _ in TESTS}
    if unknown:
        raise SystemExit(f"unknown tests: {', '.join(sorted(unknown))}")
    for name, function in TESTS:
        if not names or name in names:
            yield name, function


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    workdir = Path(sys.argv[1])
    suite = Suite(workdir)
    # On a real host the module may be loaded already.
    loaded = run_command("insmod", str(workdir / "speaker.ko")) if not os.path.exists(DEVICE) else None
    if loaded is not None and loaded.returncode != 0:
        print(f"FAIL insmod: {loaded.stderr.strip()}")
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    for name, function in selected(sys.argv[2:]):
        started = time.monotonic()
        try:
            function(suite)
        except Exception as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
            for line in traceback.format_exc().splitlines():
                print(f"  {line}")
        else:
            passed += 1
            print(f"ok {name} ({time.monotonic() - started:.1f} s)")
        finally:
            try:
                suite.cleanup()
            except Exception as exc:
                print(f"  cleanup after {name} failed: {exc}")
        sys.stdout.flush()
    suite.close_device()
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
