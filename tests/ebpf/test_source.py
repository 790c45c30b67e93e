"""The ebpf source against a real kernel: bpftrace, containers and a program that counts its own syscalls.

Each test compares the source's counts with the count that syscall_loop
prints for itself. runc's init also calls getppid in the container, once
before it installs the seccomp filter and once after, just before it execs
the program. So a run of the program with nothing to do gives the baseline
to add. The exact tests count only syscalls made under the seccomp filter
(count_before_seccomp = false): before the filter, runc adds the process
to one cgroup hierarchy after the other, so whether its first getppid is
counted depends on timing.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.ebpf.conftest import LOOP_IMAGE, run_loop_container, wait_for_flush

pytestmark = pytest.mark.system

X32_GETPID = 0x40000000 | 39


@pytest.mark.parametrize("hierarchy", ["v2", "v1"])
def test_abi_counts_match_program(bpftrace_ready, loop_image, background_ebpf, hierarchy: str) -> None:
    running = background_ebpf(cgroup_hierarchy=hierarchy, count_before_seccomp=False)
    baseline_id, _ = run_loop_container(loop_image, "abi", "0")
    container_id, printed = run_loop_container(loop_image, "abi", "2000")
    wait_for_flush()
    result = running.stop()

    assert result.exit_code == 0, result.log[-5:]
    assert not result.losses
    counted = result.counts[container_id]
    baseline = result.counts[baseline_id]
    assert printed == {("x86_64", 110): 2000, ("x86", 20): 2000, ("x32", X32_GETPID): 2000}
    assert baseline[("x86_64", 110)] == 1
    assert counted[("x86_64", 110)] == 2000 + baseline[("x86_64", 110)]
    # runc makes no i386 or x32 syscalls, so these need no baseline.
    assert counted[("x86", 20)] == 2000
    assert counted[("x32", X32_GETPID)] == 2000
    assert baseline[("x86", 20)] == 0


def test_counts_come_in_slots_of_resolution(bpftrace_ready, loop_image, background_ebpf) -> None:
    running = background_ebpf(resolution="20ms", period="200ms")
    before = time.time()
    container_id, _ = run_loop_container(loop_image, "storm", "1")
    after = time.time()
    wait_for_flush(0.2)
    result = running.stop()

    slots = [
        event
        for event in result.events
        if event["type"] == "SyscallCounts" and event["container_id"] == container_id
    ]
    assert slots
    for event in slots:
        assert event["end_time"] - event["start_time"] == pytest.approx(0.02, abs=1e-6)
        assert before - 0.05 <= event["start_time"] <= after + 0.05
    # One event per container and slot.
    starts = [round(event["start_time"], 4) for event in slots]
    assert len(set(starts)) == len(starts)


def test_container_started_before_source(bpftrace_ready, loop_image, tmp_path, background_ebpf) -> None:
    name = f"spk-f-early-{tmp_path.name[-12:]}"
    container = subprocess.run(
        ["docker", "run", "-d", "--rm", "--network", "none", "--name", name, loop_image, "storm", "30"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        running = background_ebpf()
        time.sleep(1.5)
        result = running.stop()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)

    assert result.exit_code == 0
    assert result.counts[container][("x86_64", 110)] > 10_000
    assert "unattributed" not in result.losses


def test_count_before_seccomp_false_drops_runc_setup(bpftrace_ready, loop_image, background_ebpf) -> None:
    everything = background_ebpf()
    only_filtered = background_ebpf(count_before_seccomp=False)
    container_id, _ = run_loop_container(loop_image, "abi", "10")
    wait_for_flush()
    all_counts = everything.stop().counts[container_id]
    filtered_counts = only_filtered.stop().counts[container_id]

    # runc mounts the root file system and pivots into it before it installs
    # Docker's default seccomp filter, and never after.
    pivot_root = ("x86_64", 155)
    assert all_counts[pivot_root] >= 1
    assert filtered_counts[pivot_root] == 0
    assert filtered_counts[("x86", 20)] == 10
    assert all_counts[("x86", 20)] == 10
    assert all_counts[("x32", X32_GETPID)] == 10
    for key, count in filtered_counts.items():
        assert count <= all_counts[key], key


def test_full_map_reported_as_loss(bpftrace_ready, loop_image, background_ebpf) -> None:
    # Slots of 1 ms make one entry per ms for the loop's getppid alone, so
    # 2000 entries per period do not fit in 1024.
    running = background_ebpf(map_size=1024, resolution="1ms", period="2s")
    run_loop_container(loop_image, "storm", "3")
    wait_for_flush(2)
    result = running.stop()

    assert result.exit_code == 3
    assert result.losses["map_full"] > 0
    problems = [line["problem"] for line in result.log_events("pipeline_problem")]
    assert any("map_full" in problem for problem in problems)


def test_image_name_has_test_prefix() -> None:
    # Containers and images made by these tests must not collide with others.
    assert LOOP_IMAGE.startswith("spk-f-")
