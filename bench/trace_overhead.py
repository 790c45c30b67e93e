"""Throughput of a traced server as a ratio to the same server untraced, per recorder.

Run as root: .venv/bin/python bench/trace_overhead.py [--rounds 3] [--workloads redis,nginx]

For each workload, one run measures the server four ways, one after the
other, in a new container each time:

* untraced: Docker's default seccomp profile and no recorder;
* audit_log: the log-everything seccomp profile, auditd writing its log, and
  a pipeline of the audit_log source;
* audit_netlink: the log-everything profile and the audit_netlink source;
* ebpf: Docker's default profile and the ebpf source.

Each recorder's pipeline is ``source -> classify -> count``. The workloads
run inside the container's network namespace (nsenter), over loopback:
redis-benchmark SET requests against speaker-demo/redis, and wrk GET
requests against speaker-demo/nginx. Rounds rotate the order of the
recorders, so slow drift of a shared machine spreads over all of them. The
table shows each run, the median throughput as a ratio to untraced, and the
median CPU time of the container per request, also as a ratio (untraced
divided by traced, so 1.00 is no overhead either way). The CPU ratio varies
less than throughput when other work shares the machine.

Needs Docker, the demo images (images/build.sh), redis-tools, wrk, auditd
and bpftrace. A recorder that cannot run is reported as skipped with the
reason. auditd is started with a configuration in a temporary directory when
none runs, and stopped afterwards; a running auditd is used as it is.

Target: ebpf at least 0.95 of untraced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RECORDERS = ("untraced", "audit_log", "audit_netlink", "ebpf")
AUDIT_RECORDERS = ("audit_log", "audit_netlink")
NAME_PREFIX = "spk-f-bench"

LOG_PROFILE = {
    "defaultAction": "SCMP_ACT_LOG",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [],
}


@dataclass(frozen=True)
class Workload:
    name: str
    image: str
    port: int


WORKLOADS = {
    "redis": Workload("redis", "speaker-demo/redis:latest", 6379),
    "nginx": Workload("nginx", "speaker-demo/nginx:latest", 80),
}


@dataclass
class Measurement:
    workload: str
    recorder: str
    round: int
    requests_per_second: float | None = None
    #: CPU time of all the container's processes per request, in microseconds.
    server_cpu_us: float | None = None
    skipped: str = ""
    pipeline_exit: int | None = None
    problems: list[str] = field(default_factory=list)


class BenchError(RuntimeError):
    """A step of the benchmark failed. The message names the step."""


def run(command: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(command[:4])} failed with code {result.returncode}: {result.stderr.strip()[-400:]}")
    return result


# --- Containers and load ----------------------------------------------------


def start_container(workload: Workload, recorder: str, profile: Path) -> tuple[str, int]:
    """Start the workload's server for one measurement and return its name and host pid."""
    name = f"{NAME_PREFIX}-{workload.name}-{recorder.replace('_', '-')}"
    run(["docker", "rm", "-f", name], check=False)
    command = ["docker", "run", "-d", "--rm", "--network", "none", "--name", name]
    if recorder in AUDIT_RECORDERS:
        command += ["--security-opt", f"seccomp={profile}"]
    run([*command, workload.image])
    pid = int(run(["docker", "inspect", "--format", "{{.State.Pid}}", name]).stdout.strip())
    wait_listening(pid, workload.port)
    return name, pid


def wait_listening(pid: int, port: int, timeout: float = 60) -> None:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(["nsenter", "-t", str(pid), "-n", PYTHON, "-c", probe], check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise BenchError(f"nothing listens on port {port} in the container of pid {pid} after {timeout:g}s")


def container_cpu_seconds(pid: int) -> float:
    """Return the CPU time used so far by the cgroup of ``pid``, from cgroup v2's cpu.stat or v1's cpuacct."""
    lines = (Path("/proc") / str(pid) / "cgroup").read_text().splitlines()
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        stat = mount / paths.get("", "/").lstrip("/") / "cpu.stat"
        if paths.get("", "/") != "/" and stat.exists():
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
    for controllers, path in paths.items():
        if "cpuacct" in controllers.split(","):
            usage = Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / "cpuacct.usage"
            if usage.exists():
                return int(usage.read_text()) / 1e9
    raise BenchError(f"no cpu.stat or cpuacct.usage for the cgroup of pid {pid}")


def load_redis(pid: int, requests: int) -> float:
    result = run(
        ["nsenter", "-t", str(pid), "-n", "redis-benchmark", "-h", "127.0.0.1", "-t", "set", "-n", str(requests),
         "-c", "20", "-q"],
        timeout=600,
    )
    # redis-benchmark -q rewrites its progress line with \r; the last one is the result.
    found = re.findall(r"SET: ([0-9.]+) requests per second", result.stdout.replace("\r", "\n"))
    if not found:
        raise BenchError(f"no SET result in redis-benchmark output: {result.stdout[-300:]!r}")
    return float(found[-1])


def load_nginx(pid: int, seconds: float) -> float:
    result = run(
        ["nsenter", "-t", str(pid), "-n", "wrk", "-t", "2", "-c", "20", "-d", f"{seconds:g}s",
         "http://127.0.0.1:80/"],
        timeout=seconds + 60,
    )
    found = re.search(r"Requests/sec:\s+([0-9.]+)", result.stdout)
    if not found:
        raise BenchError(f"no Requests/sec in wrk output: {result.stdout[-300:]!r}")
    return float(found.group(1))


# --- Recorders --------------------------------------------------------------


class Pipeline:
    """``python -m speaker run`` of one recorder, in the background."""

    def __init__(self, path: Path) -> None:
        self.log: list[dict] = []
        self.process = subprocess.Popen(
            [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(path)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": "text", "text": line.strip()}
            self.log.append(entry)
            if entry.get("event") == "pipeline_started":
                self.started.set()

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.started.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                errors = [entry.get("error") or entry.get("text") for entry in self.log if entry.get("level") == "error"]
                raise BenchError("the pipeline did not start: " + "; ".join(str(error) for error in errors[-3:]))

    def stop(self) -> tuple[int, list[str]]:
        if self.process.poll() is None:
            self.process.send_signal(2)
        try:
            code = self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(5)
        problems = [entry["problem"] for entry in self.log if entry.get("event") == "pipeline_problem"]
        return code, problems


def write_pipeline(directory: Path, recorder: str, audit_log: Path | None) -> Path:
    source = {"type": recorder}
    if recorder == "audit_log" and audit_log is not None:
        source["path"] = str(audit_log)
    lines = ["[sources.recorder]"] + [f"{key} = {json.dumps(value)}" for key, value in source.items()]
    lines += [
        "",
        "[stages.classify]",
        'type = "classify"',
        'inputs = ["recorder"]',
        "",
        "[sinks.count]",
        'type = "count"',
        'inputs = ["classify"]',
    ]
    path = directory / f"{recorder}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def running_auditd() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "auditd":
                    return int(entry.name)
            except OSError:
                continue
    return None


def auditd_log_file(pid: int) -> Path:
    """Return the log_file of a running auditd, read from the auditd.conf it was started with."""
    arguments = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    config_dir = Path("/etc/audit")
    if b"-c" in arguments:
        config_dir = Path(arguments[arguments.index(b"-c") + 1].decode())
    for line in (config_dir / "auditd.conf").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "log_file":
            return Path(value.strip())
    return Path("/var/log/audit/audit.log")


def start_auditd(directory: Path) -> subprocess.Popen[bytes]:
    """Start auditd in the foreground with Debian's settings, logging to ``directory``."""
    config = (Path("/etc/audit/auditd.conf")).read_text()
    config = re.sub(r"(?m)^log_file\s*=.*$", f"log_file = {directory / 'audit.log'}", config)
    config = re.sub(r"(?m)^plugin_dir\s*=.*$", f"plugin_dir = {directory / 'plugins.d'}", config)
    (directory / "plugins.d").mkdir(exist_ok=True)
    (directory / "auditd.conf").write_text(config)
    process = subprocess.Popen(["auditd", "-n", "-c", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (directory / "audit.log").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise BenchError(f"auditd did not start: {stderr.strip()[-300:]}")
        time.sleep(0.1)
    return process


# --- Measurement ------------------------------------------------------------


def measure(workload: Workload, recorder: str, round_number: int, args: argparse.Namespace, work: Path,
            audit_log: Path | None) -> Measurement:
    result = Measurement(workload.name, recorder, round_number)
    pipeline = None
    container = None
    try:
        if recorder != "untraced":
            pipeline = Pipeline(write_pipeline(work, recorder, audit_log))
            pipeline.wait_started()
        container, pid = start_container(workload, recorder, work / "log-profile.json")
        if workload.name == "redis":
            load_redis(pid, args.requests // 5)
            cpu_before = container_cpu_seconds(pid)
            result.requests_per_second = load_redis(pid, args.requests)
            requests = args.requests
        else:
            load_nginx(pid, 2)
            cpu_before = container_cpu_seconds(pid)
            result.requests_per_second = load_nginx(pid, args.seconds)
            requests = result.requests_per_second * args.seconds
        result.server_cpu_us = (container_cpu_seconds(pid) - cpu_before) / requests * 1e6
    except BenchError as exc:
        result.skipped = str(exc)
    finally:
        if container is not None:
            run(["docker", "rm", "-f", container], check=False)
        if pipeline is not None:
            result.pipeline_exit, result.problems = pipeline.stop()
    return result


def print_table(results: list[Measurement]) -> None:
    """Print per workload and recorder the median throughput and server CPU per request, as ratios to untraced.

    The CPU ratio is untraced CPU per request divided by traced, so both
    ratios read "1.00 = no overhead". It varies less than throughput on a
    machine that other work shares.
    """
    print(f"\n{'workload':8} {'recorder':14} {'ratio':>6} {'median req/s':>13} {'cpu ratio':>9} {'cpu us/req':>10}  runs (req/s)")
    for workload in dict.fromkeys(item.workload for item in results):
        rows = [item for item in results if item.workload == workload]
        base = [item for item in rows if item.recorder == "untraced" and item.requests_per_second]
        base_rate = statistics.median(item.requests_per_second for item in base) if base else None
        base_cpu = statistics.median(item.server_cpu_us for item in base) if base else None
        for recorder in RECORDERS:
            runs = [item for item in rows if item.recorder == recorder]
            if not runs:
                continue
            done = [item for item in runs if item.requests_per_second]
            if not done:
                print(f"{workload:8} {recorder:14} {'-':>6} {'-':>13} {'-':>9} {'-':>10}  skipped: {runs[0].skipped}")
                continue
            rate = statistics.median(item.requests_per_second for item in done)
            cpu = statistics.median(item.server_cpu_us for item in done)
            ratio = f"{rate / base_rate:.2f}" if base_rate else "-"
            cpu_ratio = f"{base_cpu / cpu:.2f}" if base_cpu else "-"
            flags = sorted({f"exit {item.pipeline_exit}" for item in runs if item.pipeline_exit not in (None, 0)})
            values = " ".join(f"{item.requests_per_second:.0f}" for item in done)
            print(f"{workload:8} {recorder:14} {ratio:>6} {rate:13.0f} {cpu_ratio:>9} {cpu:10.1f}  {values}"
                  + (f"  ({', '.join(flags)})" if flags else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements per workload and recorder (default 3)")
    parser.add_argument("--workloads", default="redis,nginx", help="comma-separated: redis, nginx")
    parser.add_argument("--recorders", default=",".join(RECORDERS), help="comma-separated subset of " + ", ".join(RECORDERS))
    parser.add_argument("--requests", type=int, default=100_000, help="redis-benchmark SET requests per measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per measurement, in seconds")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args()

    if os.geteuid() != 0:
        print("bench/trace_overhead.py must run as root (nsenter, audit, bpftrace)", file=sys.stderr)
        return 2
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    recorders = [name for name in args.recorders.split(",") if name]
    for tool in ("docker", "nsenter", "redis-benchmark", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix=f"{NAME_PREFIX}-") as temporary:
        work = Path(temporary)
        (work / "log-profile.json").write_text(json.dumps(LOG_PROFILE))
        auditd = None
        audit_log = None
        if "audit_log" in recorders:
            pid = running_auditd()
            if pid is None:
                auditd = start_auditd(work)
                audit_log = work / "audit.log"
            else:
                audit_log = auditd_log_file(pid)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; auditd log {audit_log}")
        try:
            for round_number in range(args.rounds):
                for workload in workloads:
                    shift = round_number % len(recorders)
                    for recorder in recorders[shift:] + recorders[:shift]:
                        item = measure(workload, recorder, round_number, args, work, audit_log)
                        results.append(item)
                        progress = (
                            f"{item.requests_per_second:.0f} req/s, {item.server_cpu_us:.1f} us CPU/req"
                            if item.requests_per_second
                            else item.skipped
                        )
                        print(f"round {round_number + 1} {workload.name:6} {recorder:14} {progress}", flush=True)
        finally:
            if auditd is not None:
                auditd.terminate()
                auditd.wait(30)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([item.__dict__ for item in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
