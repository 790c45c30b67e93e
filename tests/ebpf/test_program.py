"""Rendering of the bpftrace program, option checks, and the error when bpftrace cannot run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from speaker.bpf.cgroups import Hierarchy
from speaker.bpf.program import ProgramSettings, build_program, render
from speaker.config import ConfigError, load_pipeline
from speaker.sources.ebpf import clear_late_ns
from tests.conftest import PYTHON, ROOT
from tests.ebpf.conftest import ebpf_pipeline

V2 = Hierarchy(version=2, mount=Path("/sys/fs/cgroup"), hierarchy_id=0)
V1 = Hierarchy(version=1, mount=Path("/sys/fs/cgroup/memory"), hierarchy_id=4, controller="memory", subsys_index=4)


def test_program_v2_keys_by_cgroup_helper() -> None:
    program = build_program(ProgramSettings(hierarchy=V2, slot_ns=10_000_000, period_ns=500_000_000))
    assert "{{" not in program
    assert "$cgroup = cgroup;" in program
    assert "/args->root == 0/" in program
    assert "@counts0[$cgroup, $call, $now / 10000000] = count();" in program
    assert "$map = ($now / 500000000) % 3;" in program
    assert "interval:ms:125" in program
    assert "seccomp" not in program


def test_program_v1_keys_by_controller_cgroup() -> None:
    program = build_program(
        ProgramSettings(hierarchy=V1, slot_ns=1_000_000, period_ns=100_000_000, count_before_seccomp=False)
    )
    assert "$cgroup = curtask->cgroups->subsys[4]->cgroup->kn->id;" in program
    assert "/args->root == 4/" in program
    assert "if ($cgroup != 1 && curtask->seccomp.mode == 2) {" in program


def test_settings_reject_period_not_multiple_of_slot() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ProgramSettings(hierarchy=V2, slot_ns=30_000_000, period_ns=500_000_000)


def test_render_names_missing_placeholder() -> None:
    with pytest.raises(KeyError, match="slot_ns"):
        render("a {{slot_ns}} b", {})


def test_pipeline_rejects_period_not_multiple_of_resolution(tmp_path: Path) -> None:
    pipeline, _ = ebpf_pipeline(tmp_path, resolution="30ms", period="500ms")
    with pytest.raises(ConfigError) as raised:
        load_pipeline(pipeline)
    message = str(raised.value)
    assert "[sources.ebpf]" in message
    assert "'period'" in message
    assert "multiple of the resolution" in message


def test_missing_bpftrace_names_alternatives(tmp_path: Path) -> None:
    # Runs on any machine: without root, BTF or x86_64 the check fails
    # earlier, with the same advice.
    pipeline, _ = ebpf_pipeline(tmp_path, bpftrace=str(tmp_path / "no-such-bpftrace"))
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "audit_netlink or audit_log" in result.stderr


def test_clear_late_only_after_map_reuse() -> None:
    # Flush in period 10 of 500 ms prints the map of period 9, which counts
    # again from 6.0 s (period 12) on.
    assert clear_late_ns(10, 500_000_000, 5.99, 0.0) == 0
    assert clear_late_ns(10, 500_000_000, 5.20, 0.0) < 0
    assert clear_late_ns(10, 500_000_000, 6.05, 0.0) == 60_000_000
    # CLOCK_BOOTTIME runs ahead of CLOCK_MONOTONIC by the time spent suspended.
    assert clear_late_ns(10, 500_000_000, 106.05, 100.0) == 60_000_000
