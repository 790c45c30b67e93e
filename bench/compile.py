"""Compile time of a 300-syscall profile for x86_64, x86 and x32, measured side by side in one run.

Run it with the project's interpreter::

    .venv/bin/python bench/compile.py [--repeat 20]

Each architecture's lists name its first 300 syscalls (lowest numbers), with
the running list a third of them, so the notify layout has work to do. Every
case is compiled ``--repeat`` times and the median is reported, together
with the program's size. The last table loads the booting filter in a forked
child and times a syscall that the filter denies with an errno, comparing
libseccomp's binary-tree layout with its linear one. A denied syscall is
used because the kernel's action cache (Linux 5.11+) skips the program for
syscalls allowed whatever their arguments, so an allowed one would not run
it. The child calls through ctypes, which adds about 2 µs per call on this
machine. The numbers are ratios from one machine and one run; they are not
pass/fail targets.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

from speaker.compile import Action, ActionKind, CompileSettings, Layout, compile_plan, plan_layout
from speaker.compile.arches import syscall_table
from speaker.compile.install import PreparedFilter
from speaker.events import PHASES, Phase

SIZE = 300
ARCH_SETS = (("x86_64",), ("x86_64", "x86"), ("x86_64", "x86", "x32"))


def lists_for(arches: tuple[str, ...]) -> dict[str, dict[Phase, frozenset[str]]]:
    lists = {}
    for arch in arches:
        table = syscall_table(arch)
        names = [name for _, name in sorted((nr, name) for name, nr in table.numbers.items())][:SIZE]
        lists[arch] = {
            Phase.BOOTING: frozenset(names),
            Phase.RUNNING: frozenset(names[: SIZE // 3]) | {"getppid"},
            Phase.SHUTDOWN: frozenset(names[SIZE // 3 :]) | {"getppid"},
        }
    return lists


def median_ms(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def syscall_ns(bpf: bytes, nr: int, calls: int) -> float:
    """Return the mean time of syscall ``nr`` in a child under ``bpf``, in nanoseconds."""
    prepared = PreparedFilter(bpf)
    libc = ctypes.CDLL(None, use_errno=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        prepared.install()
        syscall = libc.syscall
        start = time.perf_counter_ns()
        for _ in range(calls):
            syscall(nr)
        elapsed = time.perf_counter_ns() - start
        os.write(write_end, elapsed.to_bytes(8, "little"))
        os._exit(0)
    os.close(write_end)
    elapsed = int.from_bytes(os.read(read_end, 8), "little")
    os.close(read_end)
    os.waitpid(pid, 0)
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="compilations per case; the median is reported")
    parser.add_argument("--calls", type=int, default=200_000, help="getppid calls per in-kernel measurement")
    args = parser.parse_args()

    print(f"Compile time of a {SIZE}-syscall profile (median of {args.repeat}), libseccomp binary-tree layout")
    print(f"{'arches':<20}{'layout':<14}{'ms':>8}{'instructions':>14}")
    times: dict[tuple[tuple[str, ...], str], float] = {}
    for arches in ARCH_SETS:
        settings = CompileSettings(arches=arches)
        lists = lists_for(arches)
        for layout, phase in ((Layout.PHASE, Phase.BOOTING), (Layout.NOTIFY, None), (Layout.NOTIFY_EXACT, None)):
            plan = plan_layout(lists, layout, settings, phase)
            elapsed = median_ms(lambda plan=plan: compile_plan(plan), args.repeat)
            label = f"{layout}" + (f" {phase}" if phase else "")
            times[(arches, label)] = elapsed
            print(f"{'+'.join(arches):<20}{label:<14}{elapsed:>8.2f}{compile_plan(plan).instructions:>14}")
        all_phases = median_ms(lambda: [compile_plan(plan_layout(lists, Layout.PHASE, settings, item)) for item in PHASES], args.repeat)
        times[(arches, "three phases")] = all_phases
        print(f"{'+'.join(arches):<20}{'three phases':<14}{all_phases:>8.2f}")

    single, triple = ARCH_SETS[0], ARCH_SETS[2]
    print()
    print("Ratios (same run):")
    print(f"  three arches / x86_64 only, phase booting: {times[(triple, 'phase booting')] / times[(single, 'phase booting')]:.2f}")
    print(f"  three arches / x86_64 only, all three phases: {times[(triple, 'three phases')] / times[(single, 'three phases')]:.2f}")
    print(f"  notify / phase booting, three arches: {times[(triple, 'notify')] / times[(triple, 'phase booting')]:.2f}")

    settings = CompileSettings(arches=triple)
    lists = lists_for(triple)
    tree = median_ms(lambda: compile_plan(plan_layout(lists, Layout.PHASE, settings, Phase.BOOTING), binary_tree=True), args.repeat)
    linear = median_ms(lambda: compile_plan(plan_layout(lists, Layout.PHASE, settings, Phase.BOOTING), binary_tree=False), args.repeat)
    print(f"  binary tree / linear compile time, three arches: {tree / linear:.2f}")

    # The highest-numbered x86_64 syscall outside the lists: the last one a linear program reaches.
    table = syscall_table("x86_64")
    denied = max((nr, name) for name, nr in table.numbers.items() if name not in lists["x86_64"][Phase.BOOTING] and name != "clone3")
    errno_settings = CompileSettings(arches=triple, default_action=Action(ActionKind.ERRNO, 1))
    print()
    print(f"In-kernel cost of {denied[1]} (nr {denied[0]}), denied with EPERM ({args.calls} calls in a forked child, ns per call)")
    costs = {}
    for binary_tree in (True, False):
        plan = plan_layout(lists, Layout.PHASE, errno_settings, Phase.BOOTING)
        bpf = compile_plan(plan, binary_tree=binary_tree).bpf
        label = f"booting, {'binary tree' if binary_tree else 'linear'} ({len(bpf) // 8} instructions)"
        costs[binary_tree] = syscall_ns(bpf, denied[0], args.calls)
        print(f"  {label:<44}{costs[binary_tree]:>8.0f}")
    print(f"  binary tree / linear: {costs[True] / costs[False]:.2f}")


if __name__ == "__main__":
    main()
