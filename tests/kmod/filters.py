"""The seccomp filters of the kernel module tests, and the probe results each one must give.

spk_group (tests/kmod/guest/spk_group.c) runs the probes below in every
member and prints one letter per probe: ``D`` when the filter denied the
syscall with errno DENY_ERRNO, ``E`` when it failed with EPERM, ``A`` when it
ran. The expected letters come from the lists written here, never from the
kernel.

Two families of filters are compiled on the host:

* test filters, built with pyseccomp: everything is allowed except a few
  probe syscalls, and the running filter allows getpriority only for
  PRIO_PROCESS, so that one probe needs the BPF program on every call;
* profile filters, built with ``speaker.compile`` (the filter_compile
  stage's compiler) from allow-lists of every syscall except the probes,
  plus each phase's own probes. These are the programs a real profile gives.

The same lists are written as PROFILE_FILE for the enforce stage's kmod back
end, which compiles them in the guest.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyseccomp

from speaker.events import Phase

DENY_ERRNO = 4000
PRIO_PROCESS = 0
PRIO_PGRP = 1


@dataclasses.dataclass(frozen=True)
class Probe:
    """One syscall that spk_group calls, in the order of its result letters."""

    label: str
    syscall: str
    arch: str = "x86_64"
    arg0: int = 0


PROBES: tuple[Probe, ...] = (
    Probe("sysinfo", "sysinfo"),
    Probe("times", "times"),
    Probe("getrusage", "getrusage"),
    Probe("getppid", "getppid"),
    Probe("uname", "uname"),
    Probe("getpriority(PRIO_PROCESS)", "getpriority", arg0=PRIO_PROCESS),
    Probe("getpriority(PRIO_PGRP)", "getpriority", arg0=PRIO_PGRP),
    Probe("x86 sysinfo", "sysinfo", "x86"),
    Probe("x86 times", "times", "x86"),
    Probe("x86 getrusage", "getrusage", "x86"),
    Probe("x86 getppid", "getppid", "x86"),
)

#: Syscalls the probes call; the profile filters allow every other syscall.
PROBED = frozenset(probe.syscall for probe in PROBES)


@dataclasses.dataclass(frozen=True)
class TestFilter:
    """A filter that allows everything except ``denied``, and ``denied_unless_process`` for arg0 other than PRIO_PROCESS."""

    name: str
    denied: frozenset[str]
    denied_unless_process: frozenset[str] = frozenset()

    def denies(self, probe: Probe) -> bool:
        if probe.syscall in self.denied:
            return True
        return probe.syscall in self.denied_unless_process and probe.arg0 != PRIO_PROCESS


TEST_FILTERS: dict[str, TestFilter] = {
    item.name: item
    for item in (
        # What the container runtime installs: only uname is denied.
        TestFilter("original", frozenset({"uname"})),
        # sysinfo is allowed whatever its arguments, so the kernel's action
        # cache allows it without running the program.
        TestFilter("booting", frozenset({"uname", "times", "getrusage", "getpriority"})),
        TestFilter("running", frozenset({"uname", "sysinfo", "getrusage"}), frozenset({"getpriority"})),
        TestFilter("shutdown", frozenset({"uname", "sysinfo", "times", "getpriority"})),
        # Stacked by one member on top of the container's filter.
        TestFilter("stacked", frozenset({"getppid"})),
    )
}

#: Probe syscalls that each phase of the profile allows, on top of every unprobed syscall.
PROFILE_PROBES: Mapping[Phase, frozenset[str]] = {
    Phase.BOOTING: frozenset({"sysinfo", "getppid"}),
    Phase.RUNNING: frozenset({"times", "getpriority", "getppid"}),
    Phase.SHUTDOWN: frozenset({"getrusage", "getppid"}),
}
PROFILE_ARCHES = ("x86_64", "x86")


def expected(filters: Iterable[TestFilter]) -> str:
    """Return the probe letters for a task whose filter chain contains ``filters``."""
    chain = tuple(filters)
    return "".join("D" if any(item.denies(probe) for item in chain) else "A" for probe in PROBES)


def profile_filter(phase: Phase | None) -> TestFilter:
    """Return the probe view of a profile filter: one phase, or the union of all phases for None."""
    allowed = frozenset().union(*PROFILE_PROBES.values()) if phase is None else PROFILE_PROBES[phase]
    name = "profile_union" if phase is None else f"profile_{phase}"
    return TestFilter(name, PROBED - allowed)


def compile_test_filter(item: TestFilter) -> bytes:
    """Compile a test filter for x86_64 and x86 with pyseccomp."""
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    syscall_filter.add_arch(pyseccomp.Arch.X86)
    for name in sorted(item.denied):
        syscall_filter.add_rule(pyseccomp.ERRNO(DENY_ERRNO), name)
    for name in sorted(item.denied_unless_process):
        syscall_filter.add_rule(pyseccomp.ERRNO(DENY_ERRNO), name, pyseccomp.Arg(0, pyseccomp.NE, PRIO_PROCESS))
    with tempfile.TemporaryFile() as output:
        syscall_filter.export_bpf(output)
        output.seek(0)
        return output.read()


#: The profile lists as profile.json, in the filters directory.
PROFILE_FILE = "profile.json"


def profile_lists() -> dict[str, dict[Phase, frozenset[str]]]:
    """Return the profile's lists: every syscall except the probes, plus each phase's own probes."""
    from speaker.compile.arches import syscall_table

    lists = {}
    for arch in PROFILE_ARCHES:
        unprobed = frozenset(syscall_table(arch).numbers) - PROBED
        lists[arch] = {phase: unprobed | probes for phase, probes in PROFILE_PROBES.items()}
    return lists


def write_profile(path: Path) -> None:
    """Write the profile's lists as a profile.json."""
    from speaker.profiles import Profile
    from speaker.profiles.profile_json import write_profile_json

    profile = Profile()
    for arch, by_phase in profile_lists().items():
        for phase, names in by_phase.items():
            profile.add_names(arch, phase, names)
    write_profile_json(profile, path)


def enforced(allowed: frozenset[str]) -> str:
    """Return the probe letters under an enforce stage program of the profile that allows the ``allowed`` probes.

    The kmod back end fails a syscall that another phase lists with EPERM
    (``deny_action = "errno"``), and one that no phase lists with the
    default action, here errno DENY_ERRNO.
    """
    listed = frozenset().union(*PROFILE_PROBES.values())
    letters = []
    for probe in PROBES:
        if probe.syscall in allowed:
            letters.append("A")
        elif probe.syscall in listed:
            letters.append("E")
        else:
            letters.append("D")
    return "".join(letters)


def compile_profile_filters() -> dict[str, bytes]:
    """Compile the profile's phase filters and its union filter with speaker.compile, keyed like ``profile_running``."""
    from speaker.compile import Action, CompileSettings, Layout, compile_profile

    lists = profile_lists()
    settings = CompileSettings(default_action=Action.parse(f"errno:{DENY_ERRNO}"), arches=PROFILE_ARCHES)
    result = compile_profile(lists, settings, (Layout.PHASE, Layout.UNION))
    programs = {}
    for program in result.programs:
        name = "profile_union" if program.plan.phase is None else f"profile_{program.plan.phase}"
        programs[name] = program.bpf
    return programs


def write_filters(directory: Path) -> dict[str, object]:
    """Compile every filter into ``directory/NAME.bpf`` and return the manifest entries the guest reads."""
    directory.mkdir(parents=True, exist_ok=True)
    views: dict[str, TestFilter] = dict(TEST_FILTERS)
    programs = {name: compile_test_filter(item) for name, item in TEST_FILTERS.items()}
    programs.update(compile_profile_filters())
    for phase in (None, *PROFILE_PROBES):
        view = profile_filter(phase)
        views[view.name] = view
    for name, bpf in programs.items():
        (directory / f"{name}.bpf").write_bytes(bpf)
    write_profile(directory / PROFILE_FILE)
    return {
        "deny_errno": DENY_ERRNO,
        "probes": [probe.label for probe in PROBES],
        "filters": {name: {"file": f"filters/{name}.bpf", "instructions": len(programs[name]) // 8} for name in programs},
        "expected": {name: expected([view]) for name, view in views.items()},
        "expected_stacked": {
            name: expected([view, TEST_FILTERS["stacked"]]) for name, view in views.items() if not name.startswith("profile")
        },
        "profile": f"filters/{PROFILE_FILE}",
        "expected_enforced": {
            **{str(phase): enforced(probes) for phase, probes in PROFILE_PROBES.items()},
            "margin": enforced(PROFILE_PROBES[Phase.BOOTING] | PROFILE_PROBES[Phase.RUNNING]),
        },
    }
