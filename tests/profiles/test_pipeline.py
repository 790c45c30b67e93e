"""The profile_files sink and the filter_compile stage, run by the engine on recorded events."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from speaker.compile import Action, CompileSettings, Layout, plan_layout
from speaker.compile.bpf import parse_program, syscall_actions
from speaker.engine import ExitCode
from speaker.events import PHASES, Phase, RecordLoss, SyscallCounts, SyscallKey, event_from_dict
from speaker.profiles import load_profile
from tests.conftest import DATA, PYTHON, ROOT

EVENTS = [DATA / "profiles" / "redis-1-events.jsonl", DATA / "profiles" / "redis-2-events.jsonl"]
PROFILES = [DATA / "profiles" / "redis-1", DATA / "profiles" / "redis-2"]
SOURCE = "tests.profiles.components:EventFile"


def run_pipeline(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(text)
    return subprocess.run(
        [PYTHON, "-m", "speaker", "run", str(pipeline), "--log-format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def merged_events(tmp_path: Path) -> Path:
    lines = [line for path in EVENTS for line in path.read_text().splitlines()]
    path = tmp_path / "both.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_containers_get_two_directories(tmp_path: Path) -> None:
    events = merged_events(tmp_path)
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{events}"

[sinks.profiles]
type = "profile_files"
inputs = ["replay"]
directory = "{tmp_path / 'out'}"
""",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["spk-c-capture-redis", "spk-c-capture-redis2"]
    for name, expected in zip(["spk-c-capture-redis", "spk-c-capture-redis2"], PROFILES):
        written = load_profile(tmp_path / "out" / name)
        reference = load_profile(expected)
        for phase in PHASES:
            assert written.phase(phase) == reference.phase(phase), (name, phase)
        assert written.complete
        for file_name in ("booting", "running", "shutdown", "docker-union.json", "docker-booting.json"):
            assert (tmp_path / "out" / name / file_name).read_bytes() == (expected / file_name).read_bytes()


def test_failed_trace_keeps_what_was_collected(tmp_path: Path) -> None:
    events = [event_from_dict(json.loads(line)) for line in EVENTS[0].read_text().splitlines()]
    # Stop before the shutdown phase starts: the source fails right after the running phase's first counts.
    cut = next(index for index, event in enumerate(events) if isinstance(event, SyscallCounts) and event.phase is Phase.RUNNING) + 1
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{EVENTS[0]}"
fail_after = {cut}

[sinks.profiles]
type = "profile_files"
inputs = ["replay"]
directory = "{tmp_path / 'out'}"
""",
    )
    assert result.returncode == ExitCode.FAILED
    directory = tmp_path / "out" / "spk-c-capture-redis"
    profile = load_profile(directory)
    assert not profile.complete
    assert profile.phase(Phase.BOOTING) == load_profile(PROFILES[0]).phase(Phase.BOOTING)
    assert profile.phase(Phase.RUNNING)
    assert not profile.phase(Phase.SHUTDOWN)
    assert any("shutdown list" in problem for problem in profile.problems)
    assert not (directory / "docker-shutdown.json").exists()
    assert (directory / "docker-booting.json").exists()


def test_lost_records_mark_incomplete(tmp_path: Path) -> None:
    events = tmp_path / "lossy.jsonl"
    loss = RecordLoss(container_id="", source="audit_netlink", reason="enobufs", count=12)
    events.write_text(EVENTS[0].read_text() + json.dumps(loss.to_dict()) + "\n")
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{events}"

[sinks.profiles]
type = "profile_files"
inputs = ["replay"]
directory = "{tmp_path / 'out'}"
""",
    )
    assert result.returncode == ExitCode.INCOMPLETE, result.stderr
    assert "is incomplete" in result.stderr
    assert "enobufs: 12" in result.stderr
    profile = load_profile(tmp_path / "out" / "spk-c-capture-redis")
    assert not profile.complete
    assert profile.traces[0].lost == {"enobufs": 12}
    for phase in PHASES:
        assert profile.phase(phase) == load_profile(PROFILES[0]).phase(phase)


def test_filter_compile_from_trace(tmp_path: Path) -> None:
    output = tmp_path / "filters.jsonl"
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{EVENTS[0]}"

[stages.compile]
type = "filter_compile"
inputs = ["replay"]
default_action = "errno"
errno = "EACCES"

[sinks.out]
type = "jsonl"
inputs = ["compile"]
path = "{output}"
""",
    )
    assert result.returncode == 0, result.stderr
    events = [event_from_dict(json.loads(line)) for line in output.read_text().splitlines()]
    assert [(event.layout, event.phase) for event in events] == [
        ("phase", Phase.BOOTING),
        ("phase", Phase.RUNNING),
        ("phase", Phase.SHUTDOWN),
        ("notify", None),
        ("notify-exact", None),
    ]
    lists = load_profile(PROFILES[0]).lists()
    for event in events:
        assert event.container_id.startswith("b9883d9fccb6")
        assert event.default_action == "errno:EACCES"
        plan = plan_layout(lists, Layout(event.layout), CompileSettings(default_action=Action.parse(event.default_action)), event.phase)
        actions = syscall_actions(parse_program(event.bpf))
        for arch, by_name in actions.items():
            for name, action in by_name.items():
                assert action == plan.action(arch, name), (event.layout, event.phase, arch, name)
        assert event.invariants["clone3"] == "errno:ENOSYS"


def test_filter_compile_profile_option(tmp_path: Path) -> None:
    output = tmp_path / "filters.jsonl"
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{EVENTS[0]}"

[stages.compile]
type = "filter_compile"
inputs = ["replay"]
profile = "{PROFILES[0]}"
layouts = ["phase", "union"]

[sinks.out]
type = "jsonl"
inputs = ["compile"]
path = "{output}"
""",
    )
    assert result.returncode == 0, result.stderr
    events = [event_from_dict(json.loads(line)) for line in output.read_text().splitlines()]
    assert [(event.layout, event.phase, event.container_id) for event in events] == [
        ("phase", Phase.BOOTING, ""),
        ("phase", Phase.RUNNING, ""),
        ("phase", Phase.SHUTDOWN, ""),
        ("union", None, ""),
    ]


def test_filter_compile_bad_profile_fails_at_setup(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for phase in PHASES:
        (bad / phase.value).write_text("read\n")
    (bad / "running").write_text("read\nwrtie\n")
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{EVENTS[0]}"

[stages.compile]
type = "filter_compile"
inputs = ["replay"]
profile = "{bad}"

[sinks.out]
type = "count"
inputs = ["compile"]
""",
    )
    assert result.returncode == ExitCode.FAILED
    assert f"{bad / 'running'}:2" in result.stderr
    assert "did you mean 'write'" in result.stderr


def test_invalid_options_name_the_key(tmp_path: Path) -> None:
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{EVENTS[0]}"

[sinks.profiles]
type = "profile_files"
inputs = ["replay"]
invariants = ["exit", "exit_grup"]
""",
    )
    assert result.returncode == ExitCode.USAGE
    assert "invariants[1]" in result.stderr
    assert "exit_grup" in result.stderr


def test_filter_compile_recompiles_late_records(tmp_path: Path) -> None:
    lines = EVENTS[0].read_text().splitlines()
    container_id = json.loads(lines[0])["container_id"]
    late = SyscallCounts(
        container_id=container_id,
        start_time=9e9,
        end_time=9e9,
        counts={SyscallKey(0, "x86_64", 87, "unlink"): 1},
        phase=Phase.SHUTDOWN,
    )
    events = tmp_path / "late.jsonl"
    events.write_text("\n".join(lines) + "\n" + json.dumps(late.to_dict()) + "\n")
    output = tmp_path / "filters.jsonl"
    result = run_pipeline(
        tmp_path,
        f"""
[sources.replay]
type = "{SOURCE}"
path = "{events}"

[stages.compile]
type = "filter_compile"
inputs = ["replay"]
layouts = ["phase"]

[sinks.out]
type = "jsonl"
inputs = ["compile"]
path = "{output}"
""",
    )
    assert result.returncode == 0, result.stderr
    filters = [event_from_dict(json.loads(line)) for line in output.read_text().splitlines()]
    shutdown = [event for event in filters if event.phase is Phase.SHUTDOWN]
    assert len(shutdown) == 2
    assert "unlink" not in shutdown[0].allowed
    assert "unlink" in shutdown[1].allowed
