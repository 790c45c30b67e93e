"""Exported Docker profiles under a real ``docker run``, and Docker's default profile as a baseline."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from speaker.compile import CompileSettings, union_plan
from speaker.compile.actions import ENOSYS, Action, ActionKind
from speaker.compile.arches import syscall_table
from speaker.compile.bpf import parse_program, syscall_actions
from speaker.compile.loaded import read_loaded_filters
from speaker.profiles import load_profile
from speaker.profiles.baseline import docker_default_baseline
from tests.conftest import DATA, PYTHON, ROOT

REDIS = DATA / "profiles" / "redis-1"
READY = "Ready to accept connections"


def docker(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *arguments], capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"spk-c-test-{uuid.uuid4().hex[:8]}"
    yield name
    docker("rm", "-f", name, check=False)


def start(name: str, image: str, profile: Path) -> int:
    docker("run", "-d", "--network", "none", "--name", name, "--security-opt", f"seccomp={profile}", image)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        logs = docker("logs", name, check=False)
        if READY in logs.stdout + logs.stderr:
            return int(docker("inspect", "-f", "{{.State.Pid}}", name).stdout)
        time.sleep(0.1)
    raise AssertionError(f"{image} did not log {READY!r} under {profile}: {docker('logs', name, check=False).stderr[-500:]}")


def test_union_profile_runs_whole_life(demo_images: dict[str, str], is_root: None, tmp_path: Path, container_name: str) -> None:
    exported = tmp_path / "union.json"
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "profile", "export", str(REDIS), "--format", "docker", "--phase", "union", "-o", str(exported)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    pid = start(container_name, demo_images["redis"], exported)
    reply = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "redis-cli", "-h", "127.0.0.1", "set", "speaker", "ok"], capture_output=True, text=True, timeout=30
    )
    assert reply.stdout.strip() == "OK", reply.stderr
    docker("stop", "-t", "10", container_name)
    state = json.loads(docker("inspect", "-f", "{{json .State}}", container_name).stdout)
    assert state["ExitCode"] == 0, state


def test_booting_profile_boots_then_kills_server(demo_images: dict[str, str], is_root: None, container_name: str) -> None:
    # The booting list has no accept4, so serving the first client kills redis with SIGSYS (exit 128 + 31).
    pid = start(container_name, demo_images["redis"], REDIS / "docker-booting.json")
    subprocess.run(["nsenter", "-t", str(pid), "-n", "redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True, timeout=30)
    docker("wait", container_name)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", container_name).stdout.strip() == "159"


def test_runc_loads_the_planned_filter(demo_images: dict[str, str], is_root: None, container_name: str) -> None:
    pid = start(container_name, demo_images["redis"], REDIS / "docker-union.json")
    filters = read_loaded_filters(pid)
    assert len(filters) == 1
    loaded = syscall_actions(parse_program(filters[0]))
    plan = union_plan(load_profile(REDIS).lists(), CompileSettings())
    table = syscall_table("x86_64")
    document = json.loads((REDIS / "docker-union.json").read_text())
    highest = max(table.number(name) for rule in document["syscalls"] for name in rule["names"])
    for name, action in loaded["x86_64"].items():
        # runc 1.1 returns ENOSYS for syscalls numbered above the highest one a
        # profile names, so that libc falls back from syscalls it does not know.
        expected = ENOSYS if table.number(name) > highest and plan.action("x86_64", name).kind is not ActionKind.ALLOW else plan.action("x86_64", name)
        assert action == expected, name
    # The profile lists only x86_64, and runc kills the thread for other arches.
    for arch in ("x86", "x32"):
        assert set(loaded[arch].values()) == {Action(ActionKind.KILL_THREAD)}, arch


def test_docker_default_baseline(demo_images: dict[str, str], is_root: None) -> None:
    profile = docker_default_baseline(demo_images["redis"], container_name=f"spk-c-baseline-{uuid.uuid4().hex[:8]}")
    allowed = profile.union("x86_64")
    # Docker's default profile allows ordinary I/O and denies mounting, rebooting and kernel modules.
    assert {"read", "write", "openat", "execve", "clone", "epoll_wait"} <= allowed
    assert not {"mount", "reboot", "init_module", "kexec_load", "unshare"} & allowed
    assert any("clone" in note and "personality" in note for note in profile.notes)
    assert profile.traces[0].docker_version


def test_show_against_docker_default(demo_images: dict[str, str], is_root: None) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "profile", "show", str(REDIS), "--baseline", "docker-default", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    running = data["phases"][1]
    assert running["syscalls"] == 10
    assert 0.9 < running["reduction_vs_baseline"] < 1.0
    assert data["baseline"]["syscalls"] > 250
