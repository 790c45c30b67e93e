"""Attributing pids to containers: cgroup paths, and short-lived processes of real containers."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from speaker.container_cgroups import CgroupResolver, start_time
from speaker.pid_table import Life, PidTable
from speaker.proc_connector import ProcConnector
from tests.conftest import require_system

ID = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"4:memory:/docker/{ID}\n0::/docker/{ID}\n", ID),  # cgroup v1, cgroupfs driver
        (f"0::/system.slice/docker-{ID}.scope\n", ID),  # cgroup v2, systemd driver
        (f"0::/system.slice/docker-{ID}.scope/init.scope\n", ID),  # a sub-cgroup inside the container
        (f"0::/kubepods/burstable/pod1/cri-containerd-{ID}.scope\n", ID),
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", ID),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", ""),
        ("9:name=systemd:/\n0::/\n", ""),
        (f"0::/docker/{ID}-extra\n", ""),  # not a whole path component
    ],
)
def test_cgroup_text_to_container(text, expected):
    assert CgroupResolver().container_of_text(text) == expected


def test_own_process_is_host():
    # The test runs on the host, never inside a Docker container.
    assert CgroupResolver().container_of(os.getpid()) == ""


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_short_lived_children_attributed_by_forks(demo_images, is_root):
    name = f"spk-g-attr-{uuid.uuid4().hex[:8]}"
    # The shell forks short-lived children that write their pids and exit at once.
    script = "for i in 1 2 3; do sh -c 'echo $$ >>/tmp/pids'; done; sleep 30"
    connector = ProcConnector()
    table = PidTable(CgroupResolver())
    table.revalidate_after = float("inf")

    try:
        result = subprocess.run(
            ["docker", "run", "-d", "--rm", "--network", "none", "--name", name, demo_images["redis"], "sh", "-c", script],
            capture_output=True,
            text=True,
        )
        require_system("docker run", result.returncode == 0, result.stderr.strip())
        container_id = result.stdout.strip()

        deadline = time.monotonic() + 10
        written: list[str] = []
        while time.monotonic() < deadline and len(written) < 3:
            listing = subprocess.run(["docker", "exec", name, "cat", "/tmp/pids"], capture_output=True, text=True)
            written = listing.stdout.split()
            time.sleep(0.1)

        for event in connector.read_available():
            if event.kind == "fork":
                table.forked(event.pid, event.parent, event.time)
            elif event.kind == "exec":
                table.execed(event.pid, event.time)
            else:
                table.exited(event.pid, event.time)
    finally:
        connector.close()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)

    assert len(written) == 3
    # /tmp/pids contains pids of the container's pid namespace, so look for the
    # host pids of the children among the forks the table attributed.
    attributed = [
        pid
        for pid, lives in table.lives.items()
        if any(life.container == container_id and life.died < float("inf") for life in lives)
    ]
    assert len(attributed) >= 3, "the three exited children should be attributed"
    for pid in attributed:
        life = next(life for life in table.lives[pid] if life.container == container_id)
        middle = (life.born + life.died) / 2
        assert table.container_at(pid, middle, middle) == container_id


def test_gone_pid_without_history_is_unattributable():
    process = subprocess.Popen(["true"])
    process.wait()
    _wait_exit(process.pid)
    table = PidTable(CgroupResolver())
    assert table.container_at(process.pid, time.time(), time.time()) is None


def test_reused_pid_keeps_old_life():
    process = subprocess.Popen(["sleep", "30"])
    try:
        table = PidTable(CgroupResolver())
        born = table.boot_wall_time + start_time(process.pid)
        # An earlier process in a container had the same pid and died before
        # the living one (a host process) was born.
        table.seen(process.pid, ID, born - 10)
        table.exited(process.pid, born - 5)
        assert table.container_at(process.pid, born - 8, born - 8) == ID
        assert table.container_at(process.pid, born + 1, born + 1) == ""
        # Between the two lives no known process had the pid.
        assert table.container_at(process.pid, born - 2, born - 2) is None
    finally:
        process.kill()
        process.wait()


def test_gone_child_gets_ancestor_container():
    # Pids above 4194304 (the largest pid_max) never exist, so every /proc
    # read fails as it does for processes that are gone.
    grandparent, parent, child = 5_000_001, 5_000_002, 5_000_003
    table = PidTable(CgroupResolver())
    now = time.time()
    table.seen(grandparent, ID, now - 10)
    # The parent's fork was seen before the grandparent's container was
    # known, so its own container stayed unknown.
    table.lives[parent] = [Life(None, born=now - 5, parent=grandparent)]
    table.forked(child, parent, now - 1)
    assert table.container_at(child, now - 0.5, now - 0.5) == ID


def test_gone_child_of_gone_host_parent_unknown():
    parent, child = 5_000_011, 5_000_012
    table = PidTable(CgroupResolver())
    now = time.time()
    table.seen(parent, "", now - 10)
    table.forked(child, parent, now - 1)
    # The parent's host life may be stale, because runc moves its init into
    # the container after the fork, so the child stays unattributed.
    assert table.container_at(child, now - 0.5, now - 0.5) is None


def test_gone_child_of_living_host_parent_is_host():
    child = 5_000_021
    table = PidTable(CgroupResolver())
    now = time.time()
    table.forked(child, os.getpid(), now - 1)
    assert table.container_at(child, now - 0.5, now - 0.5) == ""
