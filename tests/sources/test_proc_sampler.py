"""proc_sampler: container discovery in cgroup trees, /proc parsing, and a real container."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

from speaker.sources.proc_sampler import container_cgroups, listening_ports, read_task, sample_container
from tests.sources.conftest import PREFIX, read_events, start_pipeline

ID_A = "a" * 64
ID_B = "b" * 64


def make_cgroup(directory: Path, pids: list[int]) -> Path:
    directory.mkdir(parents=True)
    (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))
    return directory


def test_finds_cgroupfs_v1_containers(tmp_path):
    make_cgroup(tmp_path / "pids" / "docker" / ID_A, [1])
    make_cgroup(tmp_path / "pids" / "docker" / "not-a-container", [1])
    make_cgroup(tmp_path / "memory" / "docker" / ID_B, [1])
    assert container_cgroups(tmp_path) == {ID_A: tmp_path / "pids" / "docker" / ID_A}


def test_finds_systemd_v2_containers(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    make_cgroup(tmp_path / "system.slice" / f"docker-{ID_A}.scope", [1])
    make_cgroup(tmp_path / "system.slice" / "docker.service", [1])
    make_cgroup(tmp_path / "docker" / ID_B, [1])
    assert container_cgroups(tmp_path) == {
        ID_A: tmp_path / "system.slice" / f"docker-{ID_A}.scope",
        ID_B: tmp_path / "docker" / ID_B,
    }


def test_samples_own_process_and_sub_cgroups(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    sleeper = threading.Event()
    thread = threading.Thread(target=sleeper.wait, args=(30,))
    thread.start()
    deadline = time.monotonic() + 5
    while read_task(Path("/proc"), os.getpid(), thread.native_id).state != "S" and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        container = make_cgroup(tmp_path / ID_A, [])
        make_cgroup(container / "init.scope", [os.getpid()])
        sample = sample_container(Path("/proc"), ID_A, container)
    finally:
        sleeper.set()
        thread.join()
        listener.close()
    assert sample is not None
    assert sample.container_id == ID_A
    assert port in sample.listening_ports
    tids = {task.tid for task in sample.tasks}
    assert os.getpid() in tids
    assert thread.native_id in tids
    waiting = next(task for task in sample.tasks if task.tid == thread.native_id)
    # The thread sleeps in futex (202 on x86_64), which /proc/PID/task/TID/syscall shows.
    assert waiting.state == "S"
    assert waiting.syscall == 202
    assert sample.cpu_ticks == sum(task.cpu_ticks for task in sample.tasks)


def test_vanished_pids_give_nothing(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    assert read_task(Path("/proc"), finished.pid, finished.pid) is None
    assert listening_ports(Path("/proc"), finished.pid) is None
    container = make_cgroup(tmp_path / ID_A, [finished.pid])
    assert sample_container(Path("/proc"), ID_A, container) is None


def test_redis_container_sampled(work_dir, demo_images):
    name = f"{PREFIX}sample-{uuid.uuid4().hex[:8]}"
    # redis-server listens while a shell loop starts and ends a process all the time.
    started = subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--network", "none", "speaker-demo/redis",
         "sh", "-c", "redis-server --save '' --appendonly no & while true; do /bin/true; done"],
        capture_output=True, text=True,
    )
    assert started.returncode == 0, started.stderr
    container_id = started.stdout.strip()

    output = work_dir / f"{name}.jsonl"
    pipeline = work_dir / f"{name}.toml"
    pipeline.write_text(
        '[sources.procs]\ntype = "proc_sampler"\ninterval = "100ms"\n\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["procs"]\npath = "{output}"\n'
    )
    try:
        deadline = time.monotonic() + 20
        while b"Ready to accept" not in subprocess.run(["docker", "logs", name], capture_output=True).stdout:
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.2)
        run = start_pipeline(pipeline)
        run.wait_for_log("container_found", container=container_id[:12])
        time.sleep(3)
        assert run.finish(interrupt=True) == 0
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)

    assert not [r for r in run.log_records() if r.get("level") in ("warning", "error")]
    ours = [sample for sample in read_events(output) if sample["container_id"] == container_id]
    assert len(ours) >= 10
    assert all(6379 in sample["listening_ports"] for sample in ours)
    comms = {task["comm"] for sample in ours for task in sample["tasks"]}
    assert "redis-server" in comms
    assert "sh" in comms
