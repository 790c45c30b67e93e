"""Record one real life of a demo container as pipeline events, for the profile and report fixtures.

Usage (as root, with Docker and kernel audit enabled)::

    python tests/data/profiles/capture.py --image speaker-demo/redis --ready "Ready to accept connections" \
        --workload "redis-benchmark -h 127.0.0.1 -n 2000 -c 2 -t set,get -q" --out events.jsonl

The container runs with ``--network none`` under a Docker profile whose
default action is SCMP_ACT_LOG, so the kernel writes one audit SECCOMP record
per syscall. The script reads those records from the audit netlink multicast
group. It only listens, so a running auditd is not disturbed. It keeps the
records of the container's processes (by /proc/PID/cgroup) and decides the
phases simply: booting from the start, running from the timestamp of the
first log line that contains ``--ready``, and shutdown from the moment it
calls ``docker stop``. The workload runs in the container's network
namespace through nsenter. Records are counted per 100 ms, per phase, and
written as SyscallCounts events with the PhaseChange and ContainerEvent
events around them, in the JSON lines form of the jsonl sink, ready for
``jsonl_replay``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from speaker.compile.arches import syscall_table
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    Phase,
    PhaseChange,
    RecordLoss,
    SyscallCounts,
    SyscallKey,
)

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_SECCOMP = 1326
_RECORD = re.compile(rb"audit\((\d+\.\d+):\d+\):.* pid=(\d+) .* arch=([0-9a-f]+) syscall=(\d+) ")
_BUCKET = 0.1


class AuditListener(threading.Thread):
    """Collect SECCOMP records from the audit multicast group until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 * 1024 * 1024)  # SO_RCVBUFFORCE
        self.sock.bind((0, AUDIT_NLGRP_READLOG))
        self.sock.settimeout(0.2)
        self.records: list[tuple[float, int, int, int]] = []
        self.overflows = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: the kernel dropped multicast messages
                    self.overflows += 1
                    continue
                raise
            offset = 0
            while offset + 16 <= len(data):
                length = int.from_bytes(data[offset : offset + 4], "little")
                kind = int.from_bytes(data[offset + 4 : offset + 6], "little")
                if length < 16:
                    break
                if kind == AUDIT_SECCOMP:
                    match = _RECORD.search(data[offset + 16 : offset + length])
                    if match:
                        stamp, pid, arch, nr = match.groups()
                        self.records.append((float(stamp), int(pid), int(arch, 16), int(nr)))
                offset += (length + 3) & ~3


def kernel_lost() -> int:
    output = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
    match = re.search(r"^lost (\d+)", output, re.MULTILINE)
    return int(match.group(1)) if match else 0


def docker(*arguments: str) -> str:
    return subprocess.run(["docker", *arguments], capture_output=True, text=True, check=True).stdout


def parse_docker_time(text: str) -> float:
    # docker logs -t prints RFC 3339 with nanoseconds, such as 2025-01-02T03:04:05.123456789Z.
    head, _, fraction = text.rstrip("Z").partition(".")
    moment = datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    return moment.timestamp() + float("0." + (fraction or "0"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--name", default="spk-c-capture")
    parser.add_argument("--ready", required=True, help="text of the log line that marks the running phase")
    parser.add_argument("--workload", default="", help="host command run in the container's network namespace")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds to stay in the running phase after the workload")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the exit for late records")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    log_profile = {"defaultAction": "SCMP_ACT_LOG", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="spk-c-log-", delete=False) as stream:
        json.dump(log_profile, stream)
        profile_path = stream.name

    listener = AuditListener()
    listener.start()
    lost_before = kernel_lost()
    subprocess.run(["docker", "rm", "-f", args.name], capture_output=True)
    created = time.time()
    container_id = docker(
        "run", "-d", "--network", "none", "--name", args.name, "--security-opt", f"seccomp={profile_path}", args.image
    ).strip()
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", container_id).strip())
    started = parse_docker_time(docker("inspect", "-f", "{{.State.StartedAt}}", container_id).strip())

    ready_time = None
    deadline = time.time() + 60
    while ready_time is None and time.time() < deadline:
        for line in docker("logs", "-t", container_id).splitlines() + subprocess.run(
            ["docker", "logs", "-t", container_id], capture_output=True, text=True
        ).stderr.splitlines():
            if args.ready in line:
                ready_time = parse_docker_time(line.split(" ", 1)[0])
                break
        time.sleep(0.2)
    if ready_time is None:
        print(f"error: {args.image} never logged {args.ready!r}", file=sys.stderr)
        return 1
    if args.workload:
        subprocess.run(["nsenter", "-t", str(pid), "-n", *shlex.split(args.workload)], check=True)
    time.sleep(args.hold)
    stop_time = time.time()
    docker("stop", "-t", "10", container_id)
    state = json.loads(docker("inspect", "-f", "{{json .State}}", container_id))
    died = parse_docker_time(state["FinishedAt"])
    time.sleep(args.settle)
    listener.stopping.set()
    listener.join()
    lost = kernel_lost() - lost_before
    docker("rm", "-f", container_id)
    os.unlink(profile_path)

    # Keep the records of processes in the container's cgroup. A process that
    # is gone can no longer be checked, so its records are kept when their
    # time lies within the container's life and its pid is not below the
    # container's init pid.
    membership: dict[int, bool] = {}

    def belongs(record_pid: int, stamp: float) -> bool:
        if record_pid not in membership:
            try:
                membership[record_pid] = container_id in Path(f"/proc/{record_pid}/cgroup").read_text()
            except OSError:
                membership[record_pid] = created - 1 <= stamp <= died + 1 and record_pid >= pid
        return membership[record_pid]

    boundaries = [(started, Phase.BOOTING), (ready_time, Phase.RUNNING), (stop_time, Phase.SHUTDOWN)]
    buckets: dict[tuple[int, Phase], collections.Counter[SyscallKey]] = collections.defaultdict(collections.Counter)
    kept_records = dropped = 0
    for stamp, record_pid, arch_token, nr in listener.records:
        if not belongs(record_pid, stamp):
            dropped += 1
            continue
        kept_records += 1
        phase = Phase.BOOTING
        for boundary, name in boundaries:
            if stamp >= boundary:
                phase = name
        if arch_token == 0x40000003:
            arch = "x86"
        elif nr & 0x40000000:
            arch = "x32"
        else:
            arch = "x86_64"
        name = syscall_table(arch).name(nr) or ""
        buckets[(math.floor(stamp / _BUCKET), phase)][SyscallKey(0, arch, nr, name)] += 1

    name = args.name
    events = [
        ContainerEvent(container_id=container_id, action=ContainerAction.CREATE, name=name, image=args.image, event_time=created),
        ContainerEvent(container_id=container_id, action=ContainerAction.START, name=name, image=args.image, pid=pid, event_time=started),
        PhaseChange(container_id=container_id, phase=Phase.BOOTING, reason="the container started", detector="start", start_time=started),
        PhaseChange(
            container_id=container_id,
            phase=Phase.RUNNING,
            previous=Phase.BOOTING,
            reason=f"the container logged {args.ready!r}",
            detector="log",
            start_time=ready_time,
        ),
        PhaseChange(
            container_id=container_id,
            phase=Phase.SHUTDOWN,
            previous=Phase.RUNNING,
            reason="docker stop sent the stop signal",
            detector="stop",
            start_time=stop_time,
        ),
    ]
    for (bucket, phase), counts in sorted(buckets.items(), key=lambda item: item[0][0]):
        start = bucket * _BUCKET
        events.append(
            SyscallCounts(
                container_id=container_id, start_time=start, end_time=start + _BUCKET, counts=dict(counts), source="audit_multicast", phase=phase
            )
        )
    events.append(ContainerEvent(container_id=container_id, action=ContainerAction.KILL, name=name, signal=15, event_time=stop_time))
    events.append(
        ContainerEvent(container_id=container_id, action=ContainerAction.DIE, name=name, exit_code=state["ExitCode"], event_time=died)
    )
    if lost or listener.overflows:
        events.append(
            RecordLoss(container_id=container_id, source="audit_multicast", reason="kernel_lost", count=max(lost, listener.overflows))
        )
    events.append(ContainerEvent(container_id=container_id, action=ContainerAction.DESTROY, name=name, event_time=time.time()))
    events.sort(key=_sort_time)
    args.out.write_text("".join(json.dumps(event.to_dict(), separators=(",", ":")) + "\n" for event in events))
    print(
        f"{args.out}: {kept_records} records kept, {dropped} of other processes dropped, kernel lost {lost}, "
        f"multicast overflows {listener.overflows}; ready after {ready_time - started:.3f} s, stop after {stop_time - started:.3f} s"
    )
    return 0


def _sort_time(event: object) -> float:
    for field in ("start_time", "event_time"):
        value = getattr(event, field, 0.0)
        if value:
            return float(value)
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
