"""Build the SPEAKER kernel module and run its tests, or bench/kmod.py, in a qemu guest.

Usage: python -m tests.kmod.stage [--bench] [--workdir DIR] [TEST ...]

Steps: build kmod/ against the Debian headers that linux-headers-amd64
installs, build the helper programs in tests/kmod/guest/, compile the test
filters, pack an initramfs, and boot the matching Debian kernel under TCG
with panic_on_oops=1 and panic_on_warn=1, so that any oops or kernel warning
ends the run early. The guest prints "N passed, N failed" last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.kmod import filters, image
from tests.kmod.kernel import GuestKernel, KernelMissing, find_kernel

REPO = Path(__file__).resolve().parents[2]
GUEST_SOURCES = REPO / "tests" / "kmod" / "guest"
GUEST_WORKDIR = "/spk"
HELPERS = ("spk_group", "spk_fuzz", "spk_bench")
SUITE = GUEST_SOURCES / "suite.py"
BENCH = REPO / "bench" / "kmod.py"

#: Packages that import some submodules only when used (anyio; aiofiles through
#: concurrent.futures), copied whole instead
#: of by what the scripts import.
WHOLE_PACKAGES = ("anyio", "asyncio", "concurrent")
#: Libraries that guest code loads with ctypes.util.find_library: pyseccomp
#: loads libseccomp, which the enforce stage's compiler needs.
CTYPES_LIBRARIES = ("seccomp",)
#: Seconds before the stage gives up on the guest.
DEFAULT_TIMEOUT = 600.0
#: Any oops or warning panics the guest. SLUB poisons and red-zones the slab
#: caches of seccomp filters (224 bytes, kmalloc-256) and of the module's
#: groups (kmalloc-1k), so that writes after free and overruns get reported.
KERNEL_ARGS = "console=ttyS0 panic=-1 panic_on_oops=1 panic_on_warn=1 slub_debug=FZP,kmalloc-256,kmalloc-1k quiet"
#: Kernel output that fails the stage even when every test passed.
KERNEL_PROBLEM = re.compile(
    r"Kernel panic|BUG:|Oops|WARNING:|general protection fault|refcount_t:|UBSAN:|kernel BUG|Call Trace:"
    r"|BUG kmalloc|Poison overwritten|Redzone overwritten|Freepointer corrupt"
)
RESULT_LINE = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)


class StageError(RuntimeError):
    """A build step failed before the guest could start."""


@dataclasses.dataclass
class StageResult:
    passed: int
    failed: int
    output: str
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0 and not self.problems


def tools_missing() -> list[str]:
    """Return the host tools the stage needs that are not installed."""
    needed = {"qemu-system-x86_64": "qemu-system-x86", "gcc": "build-essential", "make": "build-essential", "ldd": "libc-bin"}
    missing = [f"{tool} (package {package})" for tool, package in needed.items() if shutil.which(tool) is None]
    if busybox() is None:
        missing.append("a static busybox (package busybox-static)")
    return missing


def busybox() -> Path | None:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            return candidate
    return None


def run(command: list[str], action: str, cwd: Path | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StageError(f"{action} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")


_LAYOUT_ENTRY = re.compile(
    r'\.release = "(?P<release>[^"]+)",\s*'
    r"\.refs = (\d+), \.users = (\d+), \.cache = (\d+), \.cache_size = (\d+),\s*"
    r"\.prev = (\d+), \.prog = (\d+), \.notif = (\d+), \.size = (\d+),"
)


def check_layout(kernel: GuestKernel) -> None:
    """Compare kmod/layout.c's entry for the guest kernel with pahole's reading of its vmlinux.

    Skipped when pahole or an unpacked vmlinux is missing; the module then
    still refuses to load on a release without an entry.
    """
    vmlinux = kernel.boot_image
    if shutil.which("pahole") is None or vmlinux.name != "vmlinux":
        return
    result = subprocess.run(
        ["sh", str(REPO / "kmod" / "tools" / "seccomp-layout.sh"), str(vmlinux), kernel.release],
        capture_output=True,
        text=True,
        check=False,
    )
    measured = _LAYOUT_ENTRY.search(result.stdout)
    if result.returncode != 0 or measured is None:
        raise StageError(f"reading struct seccomp_filter from {vmlinux} failed: {result.stderr.strip()}")
    table = {match.group("release"): match.groups()[1:] for match in _LAYOUT_ENTRY.finditer((REPO / "kmod" / "layout.c").read_text())}
    if table.get(kernel.release) != measured.groups()[1:]:
        state = "differs from" if kernel.release in table else "is missing in"
        raise StageError(
            f"the struct seccomp_filter layout of {kernel.release} {state} kmod/layout.c; pahole on {vmlinux} gives:\n{result.stdout}"
        )


def build_modules(kernel: GuestKernel, workdir: Path, *, unknown_layout: bool = False) -> dict[str, Path]:
    """Build kmod/ in a copy under workdir, so the checkout stays free of build output.

    Returns speaker.ko and, with ``unknown_layout``, also
    speaker-unknown-layout.ko: the same module with a layout table that
    names no real release, which must refuse to load. Only layout.c is
    compiled again for it.
    """
    source = workdir / "kmod"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(REPO / "kmod", source, ignore=shutil.ignore_patterns("*.o", "*.ko", "*.mod*", ".*", "Module.symvers", "modules.order"))
    make = ["make", "-C", str(kernel.headers), f"M={source}", "modules"]
    run(make, f"building the module against {kernel.headers}")
    modules = {"speaker.ko": workdir / "speaker.ko"}
    shutil.copy2(source / "speaker.ko", modules["speaker.ko"])
    if unknown_layout:
        layout = source / "layout.c"
        layout.write_text(layout.read_text().replace('.release = "', '.release = "unverified-'))
        run(make, "building the module with an unknown layout")
        modules["speaker-unknown-layout.ko"] = workdir / "speaker-unknown-layout.ko"
        shutil.copy2(source / "speaker.ko", modules["speaker-unknown-layout.ko"])
    return modules


def build_helpers(workdir: Path) -> dict[str, Path]:
    built = {}
    for name in HELPERS:
        output = workdir / name
        run(
            ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(output), str(GUEST_SOURCES / f"{name}.c")],
            f"compiling {name}",
        )
        built[name] = output
    return built


def init_script(entry: Path, arguments: list[str]) -> bytes:
    python_path = ":".join(image.guest_python_path(REPO))
    command = " ".join([str(image.guest_python()), "-S", "-B", str(entry), *arguments])
    return f"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp stays the initramfs's own directory, writable like the rest of it: a
# tmpfs mounted over it would hide a checkout or a virtualenv under /tmp.
mkdir -p /tmp
echo "speaker-guest: booted after $(cut -d ' ' -f 1 /proc/uptime) s"
cd {GUEST_WORKDIR}
PYTHONPATH={python_path} {command}
echo "speaker-guest: exit status $?"
poweroff -f
""".encode()


def build_image(
    workdir: Path, modules: dict[str, Path], helpers: dict[str, Path], entry: Path, arguments: list[str]
) -> Path:
    bundle = image.Initramfs()
    found = busybox()
    if found is None:
        raise StageError("no static busybox found; install busybox-static")
    image.add_busybox(bundle, found)
    image.add_python(bundle, [entry], REPO, WHOLE_PACKAGES)
    image.add_ctypes_libraries(bundle, CTYPES_LIBRARIES)
    for name, module in modules.items():
        bundle.add_host_file(module, f"{GUEST_WORKDIR}/{name}")
    for name, path in helpers.items():
        bundle.add_host_file(path, f"{GUEST_WORKDIR}/{name}")
    manifest = filters.write_filters(workdir / "filters")
    for path in sorted((workdir / "filters").glob("*.bpf")) + [workdir / "filters" / filters.PROFILE_FILE]:
        bundle.add_host_file(path, f"{GUEST_WORKDIR}/filters/{path.name}")
    bundle.add_data(f"{GUEST_WORKDIR}/manifest.json", json.dumps(manifest, indent=1).encode())
    bundle.add_data("/init", init_script(entry, arguments), 0o755)
    output = workdir / "initramfs.cpio"
    bundle.write(output)
    return output


def boot(kernel: GuestKernel, initramfs: Path, *, timeout: float, smp: int, memory: int, log: Path) -> str:
    """Boot the guest, copy its console to log as it runs, and return the console output."""
    command = [
        "qemu-system-x86_64",
        "-kernel", str(kernel.boot_image),
        "-initrd", str(initramfs),
        "-append", KERNEL_ARGS,
        "-cpu", "max",
        "-smp", str(smp),
        "-m", str(memory),
        "-nographic", "-nodefaults", "-serial", "stdio", "-display", "none", "-no-reboot",
    ]  # fmt: skip
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            handle.write(f"\nspeaker-stage: qemu killed after {timeout:.0f} s\n".encode())
    return log.read_bytes().decode(errors="replace")


def parse(output: str, seconds: float, *, bench: bool = False) -> StageResult:
    """Read the guest's console: the suite's result line, or for the benchmark its exit status."""
    output = output.replace("\r\n", "\n")
    problems = [line.strip() for line in output.splitlines() if KERNEL_PROBLEM.search(line)]
    if bench:
        finished = "speaker-guest: exit status 0" in output
        if not finished:
            problems.append("bench/kmod.py did not exit with status 0")
        return StageResult(int(finished), int(not finished), output, problems, seconds)
    match = None
    for match in RESULT_LINE.finditer(output):
        pass
    if match is None:
        problems.append("the guest never printed its 'N passed, N failed' line")
        return StageResult(0, 1, output, problems, seconds)
    return StageResult(int(match.group(1)), int(match.group(2)), output, problems, seconds)


def prepare(workdir: Path, release: str | None = None) -> None:
    """Build the module, the helper programs, the filters and manifest.json into workdir, without booting.

    For running tests/kmod/guest/suite.py or bench/kmod.py as root on a host that can load modules.
    """
    kernel = find_kernel(release)
    build_modules(kernel, workdir, unknown_layout=True)
    build_helpers(workdir)
    manifest = filters.write_filters(workdir / "filters")
    (workdir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def run_stage(
    workdir: Path | None = None,
    *,
    bench: bool = False,
    tests: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    smp: int = 2,
    memory: int = 1024,
    release: str | None = None,
) -> StageResult:
    """Build everything, boot the guest and return what it reported. Raises StageError or KernelMissing."""
    started = time.monotonic()
    own_dir = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="speaker-kmod-")) if workdir is None else workdir
    directory.mkdir(parents=True, exist_ok=True)
    try:
        kernel = find_kernel(release)
        check_layout(kernel)
        modules = build_modules(kernel, directory, unknown_layout=not bench)
        helpers = build_helpers(directory)
        entry = BENCH if bench else SUITE
        arguments = [GUEST_WORKDIR, *(tests or [])]
        initramfs = build_image(directory, modules, helpers, entry, arguments)
        output = boot(kernel, initramfs, timeout=timeout, smp=smp, memory=memory, log=directory / "console.log")
        return parse(output, time.monotonic() - started, bench=bench)
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.kmod.stage", description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", help="guest tests to run (default: all)")
    parser.add_argument("--bench", action="store_true", help="run bench/kmod.py in the guest instead of the tests")
    parser.add_argument("--workdir", type=Path, help="keep build output and console.log here (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds before qemu is killed")
    parser.add_argument("--smp", type=int, default=2, help="guest CPUs")
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    parser.add_argument("--release", help="kernel release to boot (default: the one linux-headers-amd64 installs)")
    parser.add_argument(
        "--prepare",
        type=Path,
        metavar="DIR",
        help="only build the module, helpers and filters into DIR, for suite.py or bench/kmod.py on a real host",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_arguments()
    missing = tools_missing()
    if missing:
        print(f"missing tools: {', '.join(missing)}; install them and run again", file=sys.stderr)
        return 2

    if args.prepare is not None:
        try:
            args.prepare.mkdir(parents=True, exist_ok=True)
            prepare(args.prepare, args.release)
        except (StageError, KernelMissing) as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"built into {args.prepare}; as root run: python tests/kmod/guest/suite.py {args.prepare}")
        return 0

    try:
        result = run_stage(
            args.workdir,
            bench=args.bench,
            tests=args.tests,
            timeout=args.timeout,
            smp=args.smp,
            memory=args.memory,
            release=args.release,
        )
    except (StageError, KernelMissing, image.ImageError) as exc:
        print(exc, file=sys.stderr)
        return 2

    sys.stdout.write(result.output)
    for problem in result.problems:
        print(f"speaker-stage: problem: {problem}")
    print(f"speaker-stage: {'passed' if result.ok else 'FAILED'} in {result.seconds:.0f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
