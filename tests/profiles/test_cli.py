"""The ``profile`` subcommands: show, merge, diff and export, with their errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from speaker.events import PHASES, Phase
from speaker.profiles import load_profile
from tests.conftest import DATA, PYTHON, ROOT

FIRST = DATA / "profiles" / "redis-1"
SECOND = DATA / "profiles" / "redis-2"


def speaker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "speaker", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_merge_two_traces_is_union(tmp_path: Path) -> None:
    result = speaker("profile", "merge", str(FIRST), str(SECOND), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = load_profile(tmp_path / "merged")
    first, second = load_profile(FIRST), load_profile(SECOND)
    for phase in PHASES:
        assert merged.phase(phase) == first.phase(phase) | second.phase(phase)
    # redis-2 ran a list workload that also mapped memory while running.
    assert "mmap" in merged.phase(Phase.RUNNING) - first.phase(Phase.RUNNING)
    assert [trace.container_name for trace in merged.traces] == ["spk-c-capture-redis", "spk-c-capture-redis2"]
    assert merged.phase_calls(Phase.RUNNING) == first.phase_calls(Phase.RUNNING) + second.phase_calls(Phase.RUNNING)
    assert any(str(FIRST) in note and str(SECOND) in note for note in merged.notes)


def test_diff_lists_added_and_removed() -> None:
    result = speaker("profile", "diff", str(FIRST), str(SECOND), "--json", "--exit-code")
    assert result.returncode == 1
    data = {item["phase"]: item for item in json.loads(result.stdout)}
    assert data["running"]["added"] == ["mmap"]
    assert data["running"]["removed"] == []
    assert speaker("profile", "diff", str(FIRST), str(FIRST), "--exit-code").returncode == 0


def test_show_table_and_json(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    names = sorted(load_profile(FIRST).union() | {"mount", "reboot"})
    baseline.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]}))
    text = speaker("profile", "show", str(FIRST), "--baseline", str(baseline))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    running_row = next(line for line in lines if line.startswith("running "))
    # Counted with comm(1) on the fixture files: running adds accept4 and getpeername, and drops 46 booting syscalls.
    assert running_row.split()[:4] == ["running", "10", "2", "46"]
    removes = next(line for line in lines if line.startswith("running removes:"))
    assert "execve" in removes
    assert "clone3 errno:ENOSYS" in text.stdout
    data = json.loads(speaker("profile", "show", str(FIRST), "--baseline", str(baseline), "--json").stdout)
    union = len(load_profile(FIRST).union())
    running = data["phases"][1]
    assert running["reduction_vs_union"] == round(1 - 10 / union, 4)
    assert running["reduction_vs_baseline"] == round(1 - 10 / (union + 2), 4)
    assert data["invariants"]["exit_group"] == "allow"
    assert set(data["instructions"]) == {"booting", "running", "shutdown", "union", "notify"}


def test_show_invariant_switched_off() -> None:
    data = json.loads(speaker("profile", "show", str(FIRST), "--no-invariant", "clone3_enosys", "--json").stdout)
    assert "clone3" not in data["invariants"]


def test_export_docker_notify_needs_listener(tmp_path: Path) -> None:
    result = speaker("profile", "export", str(FIRST), "--format", "docker", "--phase", "notify")
    assert result.returncode == 2
    assert "listenerPath" in result.stderr
    result = speaker(
        "profile", "export", str(FIRST), "--format", "oci", "--phase", "notify", "--listener-path", "/run/speaker/notify.sock"
    )
    data = json.loads(result.stdout)
    assert data["listenerPath"] == "/run/speaker/notify.sock"
    notified = next(rule["names"] for rule in data["syscalls"] if rule["action"] == "SCMP_ACT_NOTIFY")
    profile = load_profile(FIRST)
    # The invariants that allow stay in the kernel (this profile has exit_group
    # and rt_sigreturn in shutdown only).
    always_allowed = {"exit", "exit_group", "rt_sigreturn", "restart_syscall"}
    booting_or_shutdown = profile.phase(Phase.BOOTING) | profile.phase(Phase.SHUTDOWN)
    assert set(notified) == booting_or_shutdown - profile.phase(Phase.RUNNING) - always_allowed
    assert all("comment" not in rule for rule in data["syscalls"])


def test_export_errno_default(tmp_path: Path) -> None:
    result = speaker("profile", "export", str(FIRST), "--format", "docker", "--default-action", "errno", "--errno", "EACCES")
    data = json.loads(result.stdout)
    assert data["defaultAction"] == "SCMP_ACT_ERRNO"
    assert data["defaultErrnoRet"] == 13


def test_export_speaker_round_trips(tmp_path: Path) -> None:
    result = speaker("profile", "export", str(FIRST), "--format", "speaker", "-o", str(tmp_path / "copy"))
    assert result.returncode == 0, result.stderr
    for name in ("booting", "running", "shutdown", "profile.json", "docker-union.json"):
        assert (tmp_path / "copy" / name).read_bytes() == (FIRST / name).read_bytes(), name


def test_bad_input_exit_code_and_location(tmp_path: Path) -> None:
    directory = tmp_path / "bad"
    directory.mkdir()
    for phase in PHASES:
        (directory / phase.value).write_text((FIRST / phase.value).read_text())
    (directory / "running").write_text("read\nepol_wait\n")
    result = speaker("profile", "show", str(directory))
    assert result.returncode == 2
    assert f"{directory / 'running'}:2:" in result.stderr
    assert "did you mean 'epoll_wait'" in result.stderr
