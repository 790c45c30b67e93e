"""Render the kernel program of the ebpf source, and check that this host can run it."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from speaker.bpf.cgroups import Hierarchy

TEMPLATE_NAME = "syscall_counts.bt"

#: The sources to use where the ebpf source cannot run. Every BpfUnavailable message ends with it.
ALTERNATIVES = "or trace with the audit_netlink or audit_log source instead"

#: Bytes that bpftrace reserves for each str(). 200 is the maximum of
#: bpftrace 0.17 and fits /system.slice/docker-<id>.scope paths (84 bytes)
#: and most Kubernetes pod paths.
STRING_LENGTH = 200

#: Time after a period boundary before the flush probe touches the previous
#: period's map, so that a syscall that read the clock just before the
#: boundary has finished its update.
FLUSH_MARGIN_NS = 10_000_000

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_TRACEFS = Path("/sys/kernel/tracing")
_DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")
_BTF = Path("/sys/kernel/btf/vmlinux")


class BpfUnavailable(RuntimeError):
    """This host cannot run the ebpf source. The message gives the reason and the next step."""


@dataclasses.dataclass(frozen=True)
class ProgramSettings:
    """Values that the program template needs."""

    hierarchy: Hierarchy
    slot_ns: int
    period_ns: int
    #: When false, only syscalls of tasks that already have a seccomp filter count.
    count_before_seccomp: bool = True

    def __post_init__(self) -> None:
        if self.slot_ns <= 0 or self.period_ns % self.slot_ns:
            raise ValueError(f"the period ({self.period_ns} ns) must be a multiple of the slot ({self.slot_ns} ns)")
        if self.period_ns < 4 * FLUSH_MARGIN_NS:
            raise ValueError(f"the period must be at least {4 * FLUSH_MARGIN_NS // 1_000_000} ms")

    @property
    def flush_ms(self) -> int:
        # A quarter period fires at least once inside each window
        # [margin, half period), which is longer than a quarter period.
        return max(1, self.period_ns // 4 // 1_000_000)


def render(template: str, values: Mapping[str, object]) -> str:
    """Replace each ``{{name}}`` in ``template``. Raises KeyError for a placeholder without a value."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"no value for placeholder {{{{{name}}}}} in the bpftrace template")
        return str(values[name])

    return _PLACEHOLDER.sub(replace, template)


def build_program(settings: ProgramSettings) -> str:
    """Return the bpftrace program text for ``settings``."""
    template = importlib.resources.files("speaker.bpf").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    # The comments mention "{{...}}" too; keep them out of the rendered program.
    code = "\n".join(line for line in template.splitlines() if not line.lstrip().startswith("//"))
    extra = "" if settings.count_before_seccomp else " && curtask->seccomp.mode == 2"
    return render(
        code,
        {
            "cgroup_id": settings.hierarchy.cgroup_id_expression,
            "extra_condition": extra,
            "hierarchy_id": settings.hierarchy.hierarchy_id,
            "slot_ns": settings.slot_ns,
            "period_ns": settings.period_ns,
            "half_period_ns": settings.period_ns // 2,
            "flush_ms": settings.flush_ms,
            "margin_ns": FLUSH_MARGIN_NS,
        },
    )


def bpftrace_environment(map_size: int) -> dict[str, str]:
    """Return the environment for bpftrace: the caller's, plus map and string sizes."""
    return {
        **os.environ,
        "BPFTRACE_MAP_KEYS_MAX": str(map_size),
        "BPFTRACE_STRLEN": str(STRING_LENGTH),
    }


def bpftrace_command(executable: str, program: str) -> list[str]:
    # -f json: one JSON object per line. -k: report failed map updates (a
    # full map) as helper_error lines instead of dropping counts silently.
    return [executable, "-f", "json", "-k", "-e", program]


def ensure_tracefs() -> None:
    """Mount tracefs at /sys/kernel/tracing unless the syscall tracepoints are already visible."""
    for root in (_TRACEFS, _DEBUGFS_TRACING):
        if (root / "events" / "raw_syscalls").is_dir():
            return
    result = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(_TRACEFS)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not (_TRACEFS / "events" / "raw_syscalls").is_dir():
        detail = result.stderr.strip() or "the raw_syscalls tracepoints are still missing"
        raise BpfUnavailable(
            f"tracefs is not mounted and mounting it failed ({detail}). "
            f"Run `mount -t tracefs nodev {_TRACEFS}` as root, {ALTERNATIVES}"
        )


def check_host(executable: str) -> str:
    """Return the path of bpftrace after checking what the program needs.

    Checks an x86_64 kernel, root, kernel BTF and the bpftrace executable.
    Raises BpfUnavailable.
    """
    machine = platform.machine()
    if machine != "x86_64":
        # TODO: support arm64: the program reads x86 thread_info.status to tell i386 syscalls apart.
        raise BpfUnavailable(f"the ebpf source supports x86_64 hosts only, this host is {machine}; {ALTERNATIVES}")
    if os.geteuid() != 0:
        raise BpfUnavailable(f"the ebpf source must run as root to load BPF programs; rerun as root, {ALTERNATIVES}")
    if not _BTF.exists():
        raise BpfUnavailable(
            f"{_BTF} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF, which the program "
            f"needs to read task fields; {ALTERNATIVES}"
        )
    path = shutil.which(executable)
    if path is None:
        raise BpfUnavailable(
            f"bpftrace not found: {executable!r} is neither an executable on PATH nor an executable file. "
            f"Install it with `apt-get install bpftrace` or set the source's bpftrace option to its path, "
            f"{ALTERNATIVES}"
        )
    return path


def bpftrace_version(path: str) -> str:
    """Return bpftrace's version string, such as "v0.17.0"."""
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False, timeout=30)
    return result.stdout.strip().removeprefix("bpftrace").strip()


def main() -> None:
    """Print the program for this host, to run or inspect it with bpftrace directly."""
    import argparse

    from speaker.bpf.cgroups import choose_hierarchy

    parser = argparse.ArgumentParser(
        prog="python -m speaker.bpf.program",
        description="Print the ebpf source's bpftrace program as it would run on this host. Run it with "
        f"BPFTRACE_STRLEN={STRING_LENGTH} bpftrace -f json -k FILE.",
    )
    parser.add_argument("--hierarchy", choices=("auto", "v1", "v2"), default="auto", help="cgroup hierarchy")
    parser.add_argument("--resolution-ms", type=int, default=10, help="time slot length in ms")
    parser.add_argument("--period-ms", type=int, default=500, help="map period in ms")
    parser.add_argument(
        "--only-filtered", action="store_true", help="count only tasks that have a seccomp filter"
    )
    args = parser.parse_args()
    settings = ProgramSettings(
        hierarchy=choose_hierarchy(args.hierarchy),
        slot_ns=args.resolution_ms * 1_000_000,
        period_ns=args.period_ms * 1_000_000,
        count_before_seccomp=not args.only_filtered,
    )
    print(build_program(settings))


if __name__ == "__main__":
    main()
