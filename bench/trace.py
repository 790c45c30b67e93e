"""Tracing speed: audit records through parsing and classification, and redis throughput when traced.

Run as root: .venv/bin/python bench/trace.py [--records N] [--repeat N] [--requests N] [--skip-parsing] [--skip-redis]

Part 1 reads one audit.log file, made of real SECCOMP records, five ways in
the same run, each ``--repeat`` times (best rate kept):

* ``grep -c type=SECCOMP``: counting lines, the floor for any reader;
* a naive parser: ``readlines`` of the whole file and a substring search per
  line for pid, arch and syscall, counted per key and named once per key;
* the audit parser and the classify stage called directly on 1 MiB chunks;
* SPEAKER parsing: the audit_log source into a count sink;
* SPEAKER parsing and classification: the audit_log source, the classify
  stage (names and containers, all pids pre-attributed as the proc connector
  would) and a count sink.

The file comes from a redis container under the logging seccomp profile
running redis-benchmark while the audit multicast socket is read, repeated
with renumbered serials until it contains ``--records`` records. Targets: at least 1M records/s through parsing and
classification, and at least twice the naive parser's rate.

Part 2 runs the same redis-benchmark (SET and GET, 20 clients) against
speaker-demo/redis three ways, one after the other: untraced (Docker's
default seccomp profile), traced by pipelines/trace.toml reading auditd's log
(audit_log), and traced reading the netlink socket (audit_netlink). The
traced throughput comes from the workload stage's log. It needs auditd
installed; when none is running it starts a private one and stops it again.

Both parts print rates and ratios, not pass or fail, and the load average
before each part, because other work on the host slows every rate.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
IMAGE = "speaker-demo/redis"
LOG_PROFILE = '{"defaultAction":"SCMP_ACT_LOG","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"]}'
PREFIX = "spk-g-bench-"
_SERIAL = re.compile(rb"msg=audit\((\d+)\.(\d+):(\d+)\)")


# --- Part 1: parsing and classification ----------------------------------------


def capture_records(work: Path, seconds: float) -> bytes:
    """Return audit.log lines of a redis container running redis-benchmark under the logging profile."""
    from speaker.audit.netlink import open_multicast
    from speaker.audit.reader import MulticastReader

    profile = work / "log.json"
    profile.write_text(LOG_PROFILE)
    name = PREFIX + "capture-" + uuid.uuid4().hex[:8]
    sock = open_multicast(64 << 20)
    reader = MulticastReader(sock, 1 << 30)
    reader.start()
    try:
        subprocess.run(
            ["docker", "run", "-d", "--rm", "--name", name, "--network", "none", "--security-opt", f"seccomp={profile}", IMAGE],
            check=True,
            capture_output=True,
        )
        pid = wait_for_port(name, 6379)
        benchmark = ["nsenter", "-t", str(pid), "-n", "redis-benchmark", "-h", "127.0.0.1", "-q", "-c", "20"]
        _run_for([*benchmark, "-n", "10000000", "-t", "set,get"], seconds)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        time.sleep(0.5)
        reader.abort()
        sock.close()
    data, _overflows = reader.take()
    # Other people's containers may log too; their records are kept, as a trace would read them.
    return b"".join(line for line in bytes(data).splitlines(keepends=True) if line.startswith(b"type=SECCOMP "))


def _run_for(command: list[str], seconds: float) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait()


def build_file(lines: bytes, records: int, path: Path) -> int:
    """Write ``lines`` repeated until ``records`` records, with increasing serials; return the count.

    Record times stay as captured, so that every record lies in the lives of
    the captured pids, before any of those pids was reused.
    """
    source = lines.splitlines(keepends=True)
    if not source:
        raise SystemExit("no SECCOMP records were captured: is the kernel audit netlink socket available?")
    serial = 0

    def renumber(match: re.Match[bytes]) -> bytes:
        nonlocal serial
        serial += 1
        return b"msg=audit(%s.%s:%d)" % (match.group(1), match.group(2), serial)

    written = 0
    with path.open("wb") as handle:
        while written < records:
            chunk = source[: records - written]
            handle.write(b"".join(_SERIAL.sub(renumber, line, count=1) for line in chunk))
            written += len(chunk)
    return written


def pids_of(path: Path) -> set[int]:
    found: set[int] = set()
    with path.open("rb") as handle:
        for line in handle:
            start = line.find(b" pid=")
            if start >= 0:
                found.add(int(line[start + 5 : line.index(b" ", start + 5)]))
    return found


def grep_rate(path: Path, records: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(["grep", "-c", "type=SECCOMP", str(path)], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    assert int(result.stdout) == records, (result.stdout, records)
    return records / elapsed


def naive_rate(path: Path, records: int) -> float:
    """Parse with readlines and str.find, the way a first script would."""
    from speaker.syscalls import syscall_name

    started = time.perf_counter()
    with path.open() as handle:
        lines = handle.readlines()
    counts: collections.Counter[tuple[int, str, int]] = collections.Counter()
    for line in lines:
        if "type=SECCOMP" not in line:
            continue
        pid_at = line.find(" pid=") + 5
        arch_at = line.find(" arch=") + 6
        nr_at = line.find(" syscall=") + 9
        pid = int(line[pid_at : line.find(" ", pid_at)])
        arch = "x86_64" if line[arch_at : line.find(" ", arch_at)] == "c000003e" else "x86"
        nr = int(line[nr_at : line.find(" ", nr_at)])
        counts[(pid, arch, nr)] += 1
    names = {(arch, nr): syscall_name(arch, nr) for _pid, arch, nr in counts}
    elapsed = time.perf_counter() - started
    assert sum(counts.values()) == records
    assert names
    return records / elapsed


def core_rate(path: Path, records: int, pids: set[int]) -> float:
    """Parse 1 MiB chunks with the audit parser and classify the counts, without a pipeline around them."""
    import anyio
    import structlog

    from speaker.audit.chunks import ChunkParser
    from speaker.audit.counting import AuditEvents
    from speaker.audit.serials import SerialTracker
    from speaker.events import ContainerAction, ContainerEvent, SyscallCounts
    from speaker.options import build_options
    from speaker.stages.classify import Classify, ClassifyOptions

    class Collect:
        """The part of speaker.component.Output that classify uses, keeping a count."""

        def __init__(self) -> None:
            self.calls = 0

        async def send(self, event: object) -> None:
            if isinstance(event, SyscallCounts):
                self.calls += sum(event.counts.values())

    class Context:
        spec = None

        def report_problem(self, code: object, message: str) -> None:
            raise AssertionError(message)

    data = path.read_bytes()
    container = "b" * 64

    async def run() -> float:
        stage = Classify("classify", build_options(ClassifyOptions, {"proc_connector": "off"}), Context())
        await stage.setup()
        stage.pids.revalidate_after = float("inf")
        collect = Collect()
        await stage.process(ContainerEvent(container_id=container, action=ContainerAction.CREATE), collect)
        for pid in pids:
            stage.pids.seen(pid, container, 1.0)
        parser = ChunkParser(SerialTracker(grace=2.0))
        events = AuditEvents("bench", structlog.get_logger("bench"), Context())
        started = time.perf_counter()
        start = 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + (1 << 20)) + 1 or len(data)
            for event in events.from_chunk(parser.parse(data[start:end])):
                await stage.process(event, collect)
            start = end
        elapsed = time.perf_counter() - started
        assert collect.calls == records, (collect.calls, records)
        return records / elapsed

    return anyio.run(run)


def pipeline_rate(work: Path, path: Path, records: int, pids: set[int], classify: bool) -> float:
    import anyio

    from speaker.config import load_pipeline
    from speaker.engine import Engine
    from speaker.events import ContainerAction, ContainerEvent

    container = "b" * 64
    seeds = work / "seeds.jsonl"
    with seeds.open("w") as handle:
        handle.write(json.dumps(ContainerEvent(container_id=container, action=ContainerAction.CREATE).to_dict()) + "\n")
        for pid in sorted(pids):
            seed = ContainerEvent(container_id=container, action=ContainerAction.EXEC_START, pid=pid, event_time=1.0)
            handle.write(json.dumps(seed.to_dict()) + "\n")
    middle = (
        f"""
[sources.seeds]
type = "jsonl_replay"
path = "{seeds}"

[stages.classify]
type = "classify"
inputs = ["audit", "seeds"]
hold = "1m"
"""
        if classify
        else ""
    )
    pipeline = work / "parse.toml"
    pipeline.write_text(
        f"""
[sources.audit]
type = "audit_log"
path = "{path}"
start = "beginning"
stop_at_end = true
adjust_kernel = false
{middle}
[sinks.count]
type = "count"
inputs = ["{'classify' if classify else 'audit'}"]
"""
    )
    engine = Engine(load_pipeline(pipeline), handle_signals=False)
    engine.build()
    started = time.perf_counter()
    result = anyio.run(engine.run)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result
    if classify:
        stage = engine.components["classify"]
        assert stage.stats["attributed"] == records, dict(stage.stats)
    return records / elapsed


def part_one(work: Path, records: int, capture_seconds: float, repeat: int) -> None:
    path = work / "audit.log"
    lines = capture_records(work, capture_seconds)
    captured = lines.count(b"\n")
    written = build_file(lines, records, path)
    size = path.stat().st_size
    print(f"audit records: {captured} captured, file of {written} records ({size / 2**20:.0f} MiB)")
    pids = pids_of(path)
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    measures = {
        "grep -c": lambda: grep_rate(path, written),
        "naive parser": lambda: naive_rate(path, written),
        "parser + classify, no pipeline": lambda: core_rate(path, written, pids),
        "SPEAKER parsing": lambda: pipeline_rate(work, path, written, pids, classify=False),
        "SPEAKER parsing + classify": lambda: pipeline_rate(work, path, written, pids, classify=True),
    }
    print(f"load average before the runs: {load_average()}; best of {repeat} runs each, wall time")
    rates = {name: max(measure() for _ in range(repeat)) for name, measure in measures.items()}
    for name, rate in rates.items():
        print(f"  {name:32s} {rate / 1e6:6.2f} M records/s")
    full = rates["SPEAKER parsing + classify"]
    print(f"  ratio parsing + classify / naive parser: {full / rates['naive parser']:.2f}")
    print(f"  ratio parsing + classify / grep -c:      {full / rates['grep -c']:.2f}")
    print(f"  ratio parsing + classify / parsing only: {full / rates['SPEAKER parsing']:.2f}")
    core = rates["parser + classify, no pipeline"]
    print(f"  ratio parser + classify without the pipeline / naive parser: {core / rates['naive parser']:.2f}")


# --- Part 2: redis throughput ---------------------------------------------------


def wait_for_port(name: str, port: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(
            subprocess.run(["docker", "inspect", "--format", "{{json .State}}", name], capture_output=True, text=True).stdout
            or "{}"
        )
        pid = state.get("Pid") or 0
        if pid and _listening(pid, port):
            return pid
        time.sleep(0.1)
    raise SystemExit(f"{name} did not listen on port {port} within {timeout} s")


def _listening(pid: int, port: int) -> bool:
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[3] == "0A" and int(line.split()[1].rpartition(":")[2], 16) == port for line in lines)


def benchmark_arguments(requests: int) -> list[str]:
    return ["redis-benchmark", "-h", "127.0.0.1", "-q", "-c", "20", "-n", str(requests), "-t", "set,get"]


def parse_rates(lines: list[str]) -> dict[str, float]:
    rates = {}
    for line in lines:
        match = re.search(r"\b(SET|GET): ([\d.]+) requests per second", line)
        if match:
            rates[match.group(1)] = float(match.group(2))
    return rates


def untraced_rates(requests: int) -> dict[str, float]:
    name = PREFIX + "untraced-" + uuid.uuid4().hex[:8]
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "none", IMAGE], check=True, capture_output=True)
    try:
        pid = wait_for_port(name, 6379)
        result = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", *benchmark_arguments(requests)], capture_output=True, text=True, check=True
        )
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    return parse_rates(result.stdout.replace("\r", "\n").splitlines())


def traced_rates(work: Path, requests: int, audit: dict[str, str]) -> dict[str, float]:
    """Run pipelines/trace.toml with the given [sources.audit] table and return the workload's rates."""
    text = (ROOT / "pipelines" / "trace.toml").read_text()
    table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in audit.items())
    text = re.sub(r"\[sources\.audit\]\n(?:[^\[\n][^\n]*\n|\n)*", f"[sources.audit]\n{table}\n\n", text)
    pipeline = work / f"trace-{audit['type']}.toml"
    pipeline.write_text(text)
    command = json.dumps(["nsenter", "-t", "{pid}", "-n", *benchmark_arguments(requests)])
    name = PREFIX + audit["type"].replace("_", "-") + "-" + uuid.uuid4().hex[:8]
    result = subprocess.run(
        [
            PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline),
            "--set", f"sources.docker.launch.name={name}",
            "--set", f"stages.workload.command={command}",
            "--set", f"sinks.profiles.directory={work / 'profiles'}",
            "--set", f"sinks.trace.path={work / (name + '.jsonl')}",
        ],
        capture_output=True,
        text=True,
        cwd=work,
    )
    for line in result.stderr.splitlines():
        if '"workload_finished"' in line:
            return parse_rates(json.loads(line)["output_tail"])
    raise SystemExit(f"the {audit['type']} trace did not finish its workload (exit {result.returncode}):\n{result.stderr[-3000:]}")


class Auditd:
    """The running auditd's log, or a private auditd started for the benchmark and stopped afterwards."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.directory: Path | None = None
        self.enabled_before = "0"

    def __enter__(self) -> Path:
        if shutil.which("auditd") is None:
            raise SystemExit("auditd is not installed: apt-get install auditd, or run with --skip-redis")
        running = subprocess.run(["pgrep", "-x", "auditd"], capture_output=True, text=True).stdout.split()
        if running:
            return self._log_of(int(running[0]))
        status = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
        self.enabled_before = next((line.split()[1] for line in status.splitlines() if line.startswith("enabled")), "0")
        self.directory = Path(tempfile.mkdtemp(prefix=PREFIX + "auditd-"))
        (self.directory / "log").mkdir()
        (self.directory / "plugins.d").mkdir()
        (self.directory / "auditd.conf").write_text(
            f"log_file = {self.directory}/log/audit.log\nlog_format = RAW\nlog_group = root\nwrite_logs = yes\n"
            "flush = INCREMENTAL_ASYNC\nfreq = 50\nmax_log_file = 512\nnum_logs = 5\nmax_log_file_action = ROTATE\n"
            "space_left = 2\nspace_left_action = IGNORE\nadmin_space_left = 1\nadmin_space_left_action = IGNORE\n"
            f"disk_full_action = IGNORE\ndisk_error_action = IGNORE\nplugin_dir = {self.directory}/plugins.d\n"
        )
        subprocess.run(["auditd", "-c", str(self.directory)], check=True)
        log = self.directory / "log" / "audit.log"
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        found = subprocess.run(["pgrep", "-f", f"auditd -c {self.directory}"], capture_output=True, text=True).stdout.split()
        if not found:
            raise SystemExit("the private auditd did not start")
        self.pid = int(found[0])
        return log

    @staticmethod
    def _log_of(pid: int) -> Path:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        config = Path("/etc/audit/auditd.conf")
        if b"-c" in arguments:
            config = Path(arguments[arguments.index(b"-c") + 1].decode()) / "auditd.conf"
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "log_file":
                return Path(value.strip())
        return Path("/var/log/audit/audit.log")

    def __exit__(self, *exc: object) -> None:
        if self.pid is None:
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run(["auditctl", "-e", self.enabled_before], capture_output=True)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def part_two(work: Path, requests: int) -> None:
    print(f"load average before the runs: {load_average()}")
    results = {"untraced": untraced_rates(requests)}
    with Auditd() as log:
        results["audit_log"] = traced_rates(
            work, requests, {"type": "audit_log", "path": str(log)}
        )
    results["audit_netlink"] = traced_rates(work, requests, {"type": "audit_netlink"})
    print(f"redis-benchmark, {requests} requests per test, 20 clients (requests/s):")
    base = results["untraced"]
    for name, rates in results.items():
        shown = ", ".join(f"{test} {rate:,.0f} ({rate / base[test]:.2f} of untraced)" for test, rate in sorted(rates.items()))
        print(f"  {name:14s} {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2_000_000, help="records in the parsing file (default 2000000)")
    parser.add_argument("--capture", type=float, default=3.0, help="seconds of redis-benchmark to capture (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each part 1 measurement; the best is printed (default 3)")
    parser.add_argument("--requests", type=int, default=100_000, help="redis-benchmark requests per test (default 100000)")
    parser.add_argument("--skip-redis", action="store_true", help="skip part 2, the redis throughput")
    parser.add_argument("--skip-parsing", action="store_true", help="skip part 1, the parsing rates")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark reads audit records and starts containers")
    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        if not args.skip_parsing:
            part_one(work, args.records, args.capture, args.repeat)
        if not args.skip_redis:
            part_two(work, args.requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
