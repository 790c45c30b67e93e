"""The audit_netlink and audit_log sources in real pipelines, with real audit and Docker."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from speaker.audit.control import DEFAULT_STATE_DIR, AuditSettingsLease
from tests.conftest import PYTHON, ROOT
from tests.sources.audit_reference import read_fixture, reference_counts
from tests.sources.conftest import PREFIX, PipelineRun, read_events, start_pipeline

GETPPID = 110


def write_pipeline(directory: Path, text: str) -> Path:
    path = directory / f"{PREFIX}{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def counts_by_source(events: list[dict]) -> dict[str, collections.Counter[tuple[int, str, int]]]:
    """Sum the SyscallCounts events per source and (pid, arch, nr)."""
    totals: dict[str, collections.Counter[tuple[int, str, int]]] = collections.defaultdict(collections.Counter)
    for event in events:
        if event["type"] == "SyscallCounts":
            for key, count in event["counts"]:
                totals[event["source"]][(key["pid"], key["arch"], key["nr"])] += count
    return totals


def losses(events: list[dict]) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for event in events:
        if event["type"] == "RecordLoss":
            found[event["reason"]] += event["count"]
    return found


def test_audit_log_replays_capture(work_dir):
    log = work_dir / "two-audit.log"
    log.write_bytes(read_fixture("two/audit.log.gz"))
    output = work_dir / "replay.jsonl"
    pipeline = write_pipeline(
        work_dir,
        f'[sources.audit]\ntype = "audit_log"\npath = "{log}"\nstart = "beginning"\nstop_at_end = true\n'
        f'read_size = "64KiB"\n\n[sinks.out]\ntype = "jsonl"\ninputs = ["audit"]\npath = "{output}"\n',
    )
    run = start_pipeline(pipeline)
    assert run.finish() == 0, "".join(run.stderr_lines)
    events = read_events(output)
    assert counts_by_source(events)["audit"] == reference_counts(log.read_bytes())
    assert losses(events) == {}
    for event in events:
        assert event["start_time"] <= event["end_time"]


def test_audit_log_without_permission(work_dir, is_root):
    log = work_dir / "private-audit.log"
    log.write_bytes(read_fixture("i386/audit.log"))
    log.chmod(0o600)
    pipeline = write_pipeline(
        work_dir,
        f'[sources.audit]\ntype = "audit_log"\npath = "{log}"\n\n[sinks.out]\ntype = "count"\ninputs = ["audit"]\n',
    )
    run = start_pipeline(pipeline, user="65534")
    assert run.finish() == 1
    errors = [record for record in run.log_records() if record.get("event") == "component_failed"]
    assert len(errors) == 1
    message = str(errors[0]["error"])
    assert str(log) in message
    assert "permission denied" in message
    assert "log_group" in message


def test_audit_log_missing_file(work_dir):
    pipeline = write_pipeline(
        work_dir,
        f'[sources.audit]\ntype = "audit_log"\npath = "{work_dir}/nothing/audit.log"\n\n'
        '[sinks.out]\ntype = "count"\ninputs = ["audit"]\n',
    )
    run = start_pipeline(pipeline)
    assert run.finish() == 1
    message = next(str(r["error"]) for r in run.log_records() if r.get("event") == "component_failed")
    assert f"{work_dir}/nothing/audit.log does not exist" in message
    assert "Start auditd" in message


def test_netlink_without_cap_audit_read(work_dir, is_root):
    pipeline = write_pipeline(
        work_dir, '[sources.audit]\ntype = "audit_netlink"\n\n[sinks.out]\ntype = "count"\ninputs = ["audit"]\n'
    )
    command = f"{PYTHON} -m speaker run --log-format json {pipeline}"
    result = subprocess.run(
        ["capsh", "--drop=cap_audit_read", "--", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert "lacks CAP_AUDIT_READ" in result.stderr
    assert "audit_log" in result.stderr


def auditctl_status() -> dict[str, int]:
    """Return the numeric fields of ``auditctl -s``, a check independent of speaker.audit."""
    output = subprocess.run(["auditctl", "-s"], capture_output=True, text=True, check=True).stdout
    status = {}
    for line in output.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            status[name] = int(value)
    return status


def baseline() -> tuple[int, int]:
    """Return the (backlog_limit, rate_limit) that the host returns to once no trace has raised settings.

    While another trace has a lease, that is the original the lease registry recorded.
    """
    if AuditSettingsLease(0).holders():
        original = json.loads((DEFAULT_STATE_DIR / "audit-settings.json").read_text())["original"]
        return original["backlog_limit"], original["rate_limit"]
    status = auditctl_status()
    return status["backlog_limit"], status["rate_limit"]


def assert_restored(expected: tuple[int, int]) -> None:
    """Check that the backlog and rate limit are back, unless another trace on the host still has a lease."""
    if AuditSettingsLease(0).holders():
        pytest.skip("another trace on this host has a lease on the audit settings, so they stay raised")
    after = auditctl_status()
    assert (after["backlog_limit"], after["rate_limit"]) == expected


def test_settings_raised_then_restored(work_dir, is_root):
    before = baseline()
    requested = max(auditctl_status()["backlog_limit"], 8192) + 17
    pipeline = write_pipeline(
        work_dir,
        f'[sources.audit]\ntype = "audit_netlink"\nbacklog_limit = {requested}\n\n'
        '[sinks.out]\ntype = "count"\ninputs = ["audit"]\n',
    )
    run = start_pipeline(pipeline)
    run.wait_for_log("pipeline_started")
    during = auditctl_status()
    assert during["backlog_limit"] >= requested
    assert during["rate_limit"] == 0
    code = run.finish(interrupt=True)
    # Other audit users on a shared host can make the kernel drop records. The
    # source must then report a loss (exit code 3), which is not this test's subject.
    reported_loss = any(record.get("event") == "records_lost" for record in run.log_records())
    assert code == 0 or (code == 3 and reported_loss), "".join(run.stderr_lines[-8:])
    assert_restored(before)


def test_settings_restored_after_failure(work_dir, is_root, demo_images):
    before = baseline()
    pipeline = write_pipeline(
        work_dir,
        '[sources.docker]\ntype = "docker_events"\n'
        f'launch = {{ image = "speaker-demo/redis", command = ["/{PREFIX}missing"], name = "{PREFIX}fail-{uuid.uuid4().hex[:6]}" }}\n'
        f'profile_dir = "{work_dir}/profiles"\n\n'
        '[sources.audit]\ntype = "audit_netlink"\nbacklog_limit = 12345\n\n'
        '[sinks.out]\ntype = "count"\ninputs = ["audit", "docker"]\n',
    )
    run = start_pipeline(pipeline)
    assert run.finish() == 1
    failed = [r for r in run.log_records() if r.get("event") == "component_failed"]
    assert failed and "cannot start container" in str(failed[0]["error"])
    assert_restored(before)


def test_enobufs_counted_with_tiny_buffer(work_dir, programs, demo_images, is_root):
    calls = 100_000
    output = work_dir / "enobufs.jsonl"
    pipeline = write_pipeline(
        work_dir,
        '[sources.audit]\ntype = "audit_netlink"\nreceive_buffer = "4KiB"\n\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["audit"]\npath = "{output}"\n',
    )
    run = start_pipeline(pipeline)
    run.wait_for_log("pipeline_started")

    name = f"{PREFIX}storm-{uuid.uuid4().hex[:8]}"
    storm = subprocess.run(
        ["docker", "run", "--rm", "--name", name, "--network", "none",
         "--security-opt", f"seccomp={programs['profile']}", "-v", f"{programs['storm']}:/storm:ro",
         "speaker-demo/redis", "/storm", str(calls)],
        capture_output=True, text=True, timeout=300,
    )
    assert storm.returncode == 0, storm.stderr
    time.sleep(1.0)
    assert run.finish(interrupt=True) == 3

    events = read_events(output)
    lost = losses(events)
    assert lost["enobufs"] >= 1
    assert lost["serial_gap"] >= 1
    received = max(
        (count for (pid, arch, nr), count in counts_by_source(events)["audit"].items() if nr == GETPPID),
        default=0,
    )
    # Every getppid record that did not arrive left a hole in the serials.
    assert received <= calls + 1
    assert received + lost["serial_gap"] >= calls + 1


def test_redis_traced_by_both_sources(work_dir, demo_images, auditd, is_root):
    before = baseline()
    name = f"{PREFIX}redis-{uuid.uuid4().hex[:8]}"
    output = work_dir / "redis.jsonl"
    pipeline = write_pipeline(
        work_dir,
        '[sources.docker]\ntype = "docker_events"\n'
        f'launch = {{ image = "speaker-demo/redis", name = "{name}" }}\n'
        f'profile_dir = "{work_dir}/profiles"\nsettle = "1500ms"\n\n'
        '[sources.netlink]\ntype = "audit_netlink"\n\n'
        f'[sources.log]\ntype = "audit_log"\npath = "{auditd.log}"\n\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["docker", "netlink", "log"]\npath = "{output}"\n',
    )
    run = start_pipeline(pipeline)
    run.wait_for_log("container_event", action="start")
    time.sleep(1.0)
    subprocess.run(["docker", "stop", name], capture_output=True, check=True, timeout=60)
    assert run.finish(timeout=90) == 0, "".join(run.stderr_lines[-20:])
    events = read_events(output)

    lifecycle = [event for event in events if event["type"] == "ContainerEvent"]
    actions = [event["action"] for event in lifecycle]
    for expected in ("create", "start", "kill", "die", "destroy"):
        assert expected in actions
    assert actions.index("create") < actions.index("start") < actions.index("kill") < actions.index("die")
    assert actions.index("die") < actions.index("destroy")
    by_action = {event["action"]: event for event in lifecycle}
    pid = by_action["start"]["pid"]
    assert pid > 0
    assert by_action["kill"]["signal"] == 15
    assert by_action["kill"]["stop_signal"] == 15
    assert by_action["die"]["exit_code"] == 0
    assert {event["name"] for event in lifecycle} == {name}

    totals = counts_by_source(events)
    from_netlink = {key: n for key, n in totals["netlink"].items() if key[0] == pid}
    from_log = {key: n for key, n in totals["log"].items() if key[0] == pid}
    assert sum(from_netlink.values()) > 100
    # Both sources read the same kernel records.
    assert from_netlink == from_log
    assert losses(events) == {}
    assert subprocess.run(["docker", "inspect", name], capture_output=True).returncode != 0
    assert_restored(before)


def test_crashed_lease_original_restored(is_root):
    expected = baseline()
    holder = subprocess.Popen(
        [PYTHON, "-c", "import time\nfrom speaker.audit.control import AuditSettingsLease\n"
         "AuditSettingsLease(9999).acquire()\nprint('acquired', flush=True)\ntime.sleep(60)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "acquired"
    holder.kill()
    holder.wait()
    assert auditctl_status()["backlog_limit"] >= 9999

    lease = AuditSettingsLease(64)
    lease.acquire()
    lease.release()
    assert_restored(expected)


def test_records_option_emits_each_record(work_dir):
    log = work_dir / "i386-audit.log"
    log.write_bytes(read_fixture("i386/audit.log"))
    output = work_dir / "records.jsonl"
    pipeline = write_pipeline(
        work_dir,
        f'[sources.audit]\ntype = "audit_log"\npath = "{log}"\nstart = "beginning"\nstop_at_end = true\n'
        f'records = true\n\n[sinks.out]\ntype = "jsonl"\ninputs = ["audit"]\npath = "{output}"\n',
    )
    run = start_pipeline(pipeline)
    assert run.finish() == 0
    events = read_events(output)
    records = [event for event in events if event["type"] == "SyscallRecord"]
    assert len(records) == 355
    assert sum(counts_by_source(events)["audit"].values()) == 355
    i386 = [(r["arch"], r["nr"], r["comm"], r["exe"]) for r in records if r["arch"] == "x86"]
    assert i386 == [("x86", 20, "i386", "/i386"), ("x86", 4, "i386", "/i386"), ("x86", 1, "i386", "/i386")]
    serials = [record["serial"] for record in records]
    assert serials == sorted(serials)


def replay_pipeline(work_dir: Path, log: Path, output: Path, extra: str = "") -> Path:
    """Write a pipeline that replays ``log`` through audit_log into a jsonl sink."""
    return write_pipeline(
        work_dir,
        f'[sources.audit]\ntype = "audit_log"\npath = "{log}"\nstart = "beginning"\nstop_at_end = true\n{extra}\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["audit"]\npath = "{output}"\n',
    )


@pytest.mark.parametrize("extra", ["", "records = true\n"])
def test_audit_log_counts_random_bytes_garbled(work_dir, extra):
    data = random.Random(5).randbytes(1 << 20)
    log = work_dir / f"random-{uuid.uuid4().hex[:8]}.log"
    log.write_bytes(data)
    output = work_dir / f"random-{uuid.uuid4().hex[:8]}.jsonl"
    run = start_pipeline(replay_pipeline(work_dir, log, output, extra))
    assert run.finish() == 3, "".join(run.stderr_lines[-8:])
    # Every line is garbled, the last one too, which has no newline.
    lines = data.split(b"\n")
    assert not any(line.startswith(b"type=") for line in lines)
    assert losses(read_events(output)) == {"garbled": len(lines)}
    problem = next(record for record in run.log_records() if record.get("event") == "pipeline_problem")
    assert f"{len(lines)} garbled" in str(problem["problem"])


def test_audit_log_reports_out_of_range_records(work_dir):
    lines = read_fixture("i386/audit.log").split(b"\n")[:-1]
    index = next(
        number for number, line in enumerate(lines) if line.startswith(b"type=SECCOMP ") and b" arch=c000003e " in line
    )
    line = lines[index]
    lines[index] = line.replace(b" arch=c000003e ", b" arch=c00000b7 ")
    log = work_dir / f"aarch64-{uuid.uuid4().hex[:8]}.log"
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    output = work_dir / f"aarch64-{uuid.uuid4().hex[:8]}.jsonl"
    run = start_pipeline(replay_pipeline(work_dir, log, output))
    assert run.finish() == 3
    events = read_events(output)
    assert losses(events) == {"out_of_range": 1}
    assert sum(counts_by_source(events)["audit"].values()) == 355 - 1
    warning = next(record for record in run.log_records() if record.get("event") == "out_of_range_records")
    assert "arch=c00000b7" in str(warning["example"])


#: Runs argv[2:] as a child and writes its peak RSS in KiB (wait4's ru_maxrss)
#: to argv[1]. Linux carries a process's peak RSS across fork and exec, so a
#: pipeline started straight from pytest would report pytest's own size
#: (above 250 MB late in the full suite). This small interpreter is the
#: parent instead.
RSS_SHIM = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measuring_rss(pipeline: Path, rss_file: Path, timeout: float) -> tuple[int, int, PipelineRun]:
    """Run a pipeline to its end; return its exit code, its peak RSS in KiB and the run with its log."""
    command = [PYTHON, "-c", RSS_SHIM, str(rss_file), PYTHON, "-m", "speaker", "run", "--log-format", "json", str(pipeline)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    run = PipelineRun(process)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the pipeline did not finish in time") from None
    run.stderr_lines = stderr.splitlines()
    return process.returncode, int(rss_file.read_text()), run


@pytest.mark.parametrize("newline", [b"\n", b""])
def test_audit_log_memory_bounded_by_long_line(work_dir, newline):
    size = 200 << 20
    log = work_dir / f"long-{uuid.uuid4().hex[:8]}.log"
    with log.open("wb") as handle:
        for _ in range(size >> 20):
            handle.write(b"A" * (1 << 20))
        handle.write(newline)
    output = work_dir / f"long-{uuid.uuid4().hex[:8]}.jsonl"
    try:
        code, peak_kib, run = run_measuring_rss(replay_pipeline(work_dir, log, output), work_dir / "rss", 120)
    finally:
        log.unlink()
    assert code == 3
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib} KiB"
    assert losses(read_events(output)) == {"garbled": 1}
    warning = next(record for record in run.log_records() if record.get("event") == "garbled_records")
    assert warning["skipped_line_bytes"] == size + len(newline)


def test_audit_log_rejects_non_regular_files(work_dir):
    fifo = work_dir / f"fifo-{uuid.uuid4().hex[:8]}.log"
    os.mkfifo(fifo)
    try:
        for path in (fifo, Path("/dev/zero")):
            pipeline = write_pipeline(
                work_dir,
                f'[sources.audit]\ntype = "audit_log"\npath = "{path}"\n\n[sinks.out]\ntype = "count"\ninputs = ["audit"]\n',
            )
            run = start_pipeline(pipeline)
            try:
                code = run.finish(timeout=30)
            finally:
                if run.process.poll() is None:
                    run.process.kill()
            assert code == 1
            failed = next(record for record in run.log_records() if record.get("event") == "component_failed")
            assert failed["error"] == (
                f"{path}: not a regular file; set path to auditd's log file, such as /var/log/audit/audit.log"
            )
    finally:
        fifo.unlink()


def test_audit_log_read_size_maximum(work_dir):
    log = work_dir / "i386-audit.log"
    log.write_bytes(read_fixture("i386/audit.log"))
    pipeline = replay_pipeline(work_dir, log, work_dir / "unused.jsonl", 'read_size = "64GiB"\n')
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "run", str(pipeline)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert """[sources.audit] key 'read_size': "64GiB" is above the maximum "64MiB\"""" in result.stderr


#: Calls two syscall numbers that no kernel defines. The kernel runs the
#: seccomp filter before it checks the number, so both are logged.
UNUSED_NUMBERS_PROGRAM = """
#include <unistd.h>
#include <sys/syscall.h>
int main(void) { syscall(4000); syscall(-1L); return 0; }
"""


def test_unused_syscall_numbers_out_of_range(work_dir, programs, demo_images, is_root):
    source = work_dir / "unused.c"
    source.write_text(UNUSED_NUMBERS_PROGRAM)
    binary = work_dir / "unused"
    build = subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    output = work_dir / "unused.jsonl"
    pipeline = write_pipeline(
        work_dir,
        '[sources.audit]\ntype = "audit_netlink"\n\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["audit"]\npath = "{output}"\n',
    )
    run = start_pipeline(pipeline)
    run.wait_for_log("pipeline_started")

    name = f"{PREFIX}unused-{uuid.uuid4().hex[:8]}"
    container = subprocess.run(
        ["docker", "run", "--rm", "--name", name, "--network", "none",
         "--security-opt", f"seccomp={programs['profile']}", "-v", f"{binary}:/unused:ro",
         "speaker-demo/redis", "/unused"],
        capture_output=True, text=True, timeout=120,
    )
    assert container.returncode == 0, container.stderr
    time.sleep(1.0)
    assert run.finish(interrupt=True) == 3

    # Other traces on the host may lose records too; only this container's are checked.
    warnings = [record for record in run.log_records() if record.get("event") == "out_of_range_records"]
    examples = " ".join(str(warning["example"]) for warning in warnings)
    assert losses(read_events(output))["out_of_range"] >= 2
    assert 'exe="/unused"' in examples
    assert "syscall=4000" in examples or "syscall=-1" in examples
    counted = {key for key in counts_by_source(read_events(output))["audit"] if key[2] in (4000, -1)}
    assert counted == set()
