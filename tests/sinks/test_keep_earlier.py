"""The file sinks keep an earlier run's output: profile_files, trace_log and violations, run twice into one place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import PHASES, Phase, SyscallCounts, event_from_dict
from speaker.keep_earlier import move_aside
from speaker.profiles import load_profile
from tests.conftest import DATA, PYTHON, ROOT, require_system

EVENTS = DATA / "profiles" / "redis-1-events.jsonl"
REFERENCE = DATA / "profiles" / "redis-1"
NAME = "spk-c-capture-redis"
CONTAINER = "b9883d9fccb6"


def trace_pipeline(tmp_path: Path, fail_after: int = -1) -> Path:
    """Write a pipeline that replays EVENTS into profiles and a trace log under tmp_path/out; return its path."""
    pipeline = tmp_path / f"trace{fail_after}.toml"
    pipeline.write_text(
        f"""
[sources.replay]
type = "tests.profiles.components:EventFile"
path = "{EVENTS}"
fail_after = {fail_after}

[sinks.profiles]
type = "profile_files"
inputs = ["replay"]
directory = "{tmp_path / 'out' / 'profiles'}"

[sinks.trace]
type = "trace_log"
inputs = ["replay"]
path = "{tmp_path / 'out' / 'trace.jsonl'}"
"""
    )
    return pipeline


def violations_pipeline(tmp_path: Path) -> Path:
    pipeline = tmp_path / "violations.toml"
    pipeline.write_text(
        f"""
[sources.replay]
type = "tests.enforce.components:FixedViolations"

[sinks.violations]
type = "violations"
inputs = ["replay"]
path = "{tmp_path / 'out' / 'violations.jsonl'}"
summary = "{tmp_path / 'out' / 'summary.json'}"
"""
    )
    return pipeline


def speaker_run(pipeline: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = [*prefix, PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def logged(result: subprocess.CompletedProcess[str], event: str) -> list[dict]:
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def stamp_of(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(seconds))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Return the bytes of every file under ``directory``, by relative path."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def failing_cut() -> int:
    """Return how many events to replay so that the source fails just after the running phase's first counts."""
    events = [event_from_dict(json.loads(line)) for line in EVENTS.read_text().splitlines()]
    return next(i for i, event in enumerate(events) if isinstance(event, SyscallCounts) and event.phase is Phase.RUNNING) + 1


def test_second_trace_keeps_first_profile_and_log(tmp_path: Path) -> None:
    first = speaker_run(trace_pipeline(tmp_path))
    assert first.returncode == 0, first.stderr
    # The container's exit and the end of the run both write its profile:
    # that rewrite replaces the first write and keeps nothing aside.
    assert [line["final"] for line in logged(first, "profile_written")] == [False, True]
    assert logged(first, "profile_kept") == []
    assert logged(first, "trace_log_kept") == []
    profiles = tmp_path / "out" / "profiles"
    first_profile = snapshot(profiles / NAME)
    first_trace = (tmp_path / "out" / "trace.jsonl").read_bytes()
    created = json.loads(first_profile["profile.json"])["created"]
    header_time = json.loads(first_trace.splitlines()[0])["created"]

    second = speaker_run(trace_pipeline(tmp_path, fail_after=failing_cut()))
    assert second.returncode == ExitCode.FAILED, second.stderr

    kept_profile = profiles / f"{NAME}.{created.replace(':', '-')}"
    assert sorted(path.name for path in profiles.iterdir()) == [NAME, kept_profile.name]
    assert snapshot(kept_profile) == first_profile
    kept = load_profile(kept_profile)
    assert kept.complete
    for phase in PHASES:
        assert kept.phase(phase) == load_profile(REFERENCE).phase(phase), phase
    newest = load_profile(profiles / NAME)
    assert not newest.complete
    assert not newest.phase(Phase.SHUTDOWN)

    (profile_line,) = logged(second, "profile_kept")
    assert profile_line["path"] == str(profiles / NAME)
    assert profile_line["moved_to"] == str(kept_profile)
    assert profile_line["container"] == CONTAINER

    kept_trace = tmp_path / "out" / f"trace.{stamp_of(header_time)}.jsonl"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["profiles", kept_trace.name, "trace.jsonl"]
    assert kept_trace.read_bytes() == first_trace
    newest_trace = (tmp_path / "out" / "trace.jsonl").read_text().splitlines()
    assert json.loads(newest_trace[0])["created"] > header_time
    assert len(newest_trace) < len(first_trace.splitlines())
    (trace_line,) = logged(second, "trace_log_kept")
    assert trace_line["path"] == str(tmp_path / "out" / "trace.jsonl")
    assert trace_line["moved_to"] == str(kept_trace)


def test_second_enforce_keeps_first_violations(tmp_path: Path) -> None:
    pipeline = violations_pipeline(tmp_path)
    out = tmp_path / "out"
    first = speaker_run(pipeline)
    assert first.returncode == 0, first.stderr
    earlier = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime) for name in ("violations.jsonl", "summary.json")}

    second = speaker_run(pipeline)
    assert second.returncode == 0, second.stderr

    kept_lines = out / f"violations.{stamp_of(earlier['violations.jsonl'][1])}.jsonl"
    kept_summary = out / f"summary.{stamp_of(earlier['summary.json'][1])}.json"
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["violations.jsonl", "summary.json", kept_lines.name, kept_summary.name]
    )
    assert kept_lines.read_bytes() == earlier["violations.jsonl"][0]
    assert kept_summary.read_bytes() == earlier["summary.json"][0]
    assert len((out / "violations.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text())["total"] == 3
    moves = {line["path"]: line["moved_to"] for line in logged(second, "violations_kept")}
    assert moves == {str(out / "violations.jsonl"): str(kept_lines), str(out / "summary.json"): str(kept_summary)}


def test_empty_violations_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "violations.jsonl").write_text("")
    result = speaker_run(violations_pipeline(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["summary.json", "violations.jsonl"]
    assert logged(result, "violations_kept") == []


@pytest.fixture
def read_only_mount(is_root: None) -> tuple[str, ...]:
    """Return a command prefix that runs its command with the directory in its first argument mounted read-only.

    The mount lives in a private mount namespace that ends with the command,
    so nothing stays read-only after a failed test. Root could rename in a
    directory of mode 0555, which is why a mount is needed.
    """
    require_system("unshare", shutil.which("unshare") is not None, "install util-linux")
    return ("unshare", "--mount", "sh", "-c", 'mount -o bind,ro "$0" "$0" && exec "$@"')


@pytest.mark.parametrize(
    ("read_only", "option"),
    [("out/profiles", "directory"), ("out", "path")],
    ids=["profiles", "trace-log"],
)
def test_read_only_trace_output_fails_at_setup(tmp_path: Path, read_only_mount, read_only: str, option: str) -> None:
    pipeline = trace_pipeline(tmp_path)
    assert speaker_run(pipeline).returncode == 0
    before = snapshot(tmp_path / "out")
    directory = tmp_path / read_only

    result = speaker_run(pipeline, (*read_only_mount, str(directory)))

    assert result.returncode == ExitCode.FAILED, result.stderr
    (failure,) = logged(result, "component_failed")
    assert failure["during"] == "setup"
    assert f"{directory} is not writable" in failure["error"]
    assert f"make {directory} writable, or set the {option} option to a writable location" in failure["error"]
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path / "out") == before


def test_read_only_violations_fail_at_setup(tmp_path: Path, read_only_mount) -> None:
    pipeline = violations_pipeline(tmp_path)
    assert speaker_run(pipeline).returncode == 0
    before = snapshot(tmp_path / "out")

    result = speaker_run(pipeline, (*read_only_mount, str(tmp_path / "out")))

    assert result.returncode == ExitCode.FAILED, result.stderr
    (failure,) = logged(result, "component_failed")
    assert f"the earlier violations file {tmp_path / 'out' / 'violations.jsonl'} cannot be moved aside" in failure["error"]
    assert f"make {tmp_path / 'out'} writable" in failure["error"]
    assert snapshot(tmp_path / "out") == before


def test_move_aside_read_only_error(tmp_path: Path, read_only_mount) -> None:
    # The sinks check the directory in setup. This test covers the rename
    # itself failing, as when the directory becomes read-only during a run.
    earlier = tmp_path / "out" / "trace.jsonl"
    earlier.parent.mkdir()
    earlier.write_text("data\n")
    script = "import sys; from pathlib import Path; from speaker.keep_earlier import move_aside; move_aside(Path(sys.argv[1]), 1796428741.0)"
    command = (*read_only_mount, str(earlier.parent), PYTHON, "-c", script, str(earlier))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert (
        f"cannot move the earlier output {earlier} aside to trace.2026-12-04T23-59-01Z.jsonl: Read-only file system. "
        f"It was left unchanged and nothing was written over it: make {earlier.parent} writable, "
        f"or move {earlier} away yourself, then run again"
    ) in result.stderr
    assert earlier.read_text() == "data\n"
    assert sorted(path.name for path in earlier.parent.iterdir()) == ["trace.jsonl"]


def test_move_aside_names(tmp_path: Path) -> None:
    # 1796428741 is 2026-12-04 23:59:01 UTC (checked with `date -u -d @1796428741`).
    trace = tmp_path / "trace.jsonl"
    trace.write_text("first\n")
    assert move_aside(trace, 1796428741.9) == tmp_path / "trace.2026-12-04T23-59-01Z.jsonl"
    trace.write_text("second\n")
    assert move_aside(trace, 1796428741.0) == tmp_path / "trace.2026-12-04T23-59-01Z-2.jsonl"
    assert (tmp_path / "trace.2026-12-04T23-59-01Z.jsonl").read_text() == "first\n"
    assert (tmp_path / "trace.2026-12-04T23-59-01Z-2.jsonl").read_text() == "second\n"
    assert not trace.exists()

    profile = tmp_path / "redis"
    profile.mkdir()
    (profile / "running").write_text("read\n")
    assert move_aside(profile, 1796428741.0) == tmp_path / "redis.2026-12-04T23-59-01Z"
    assert (tmp_path / "redis.2026-12-04T23-59-01Z" / "running").read_text() == "read\n"

    plain = tmp_path / "summary"
    plain.write_text("{}")
    assert move_aside(plain, 1796428741.0) == tmp_path / "summary.2026-12-04T23-59-01Z"


@pytest.mark.parametrize("written_at", [None, float("nan"), 1e30], ids=["none", "nan", "out-of-range"])
def test_move_aside_falls_back_to_mtime(tmp_path: Path, written_at: float | None) -> None:
    path = tmp_path / "violations.jsonl"
    path.write_text("{}\n")
    os.utime(path, (1796428741, 1796428741))
    assert move_aside(path, written_at) == tmp_path / "violations.2026-12-04T23-59-01Z.jsonl"


def test_move_aside_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ComponentError, match="cannot read the modification time of the earlier output"):
        move_aside(tmp_path / "gone.jsonl")


def test_unreadable_times_fall_back_to_mtime(tmp_path: Path) -> None:
    # A trace log without a header and a profile whose profile.json is not
    # JSON are named after their modification time, 1796428741.
    out = tmp_path / "out"
    (out / "profiles" / NAME).mkdir(parents=True)
    (out / "profiles" / NAME / "profile.json").write_text("{not json")
    (out / "trace.jsonl").write_text("not a trace log\n")
    os.utime(out / "profiles" / NAME, (1796428741, 1796428741))
    os.utime(out / "trace.jsonl", (1796428741, 1796428741))

    result = speaker_run(trace_pipeline(tmp_path))

    assert result.returncode == 0, result.stderr
    assert (out / "profiles" / f"{NAME}.2026-12-04T23-59-01Z" / "profile.json").read_text() == "{not json"
    assert (out / "trace.2026-12-04T23-59-01Z.jsonl").read_text() == "not a trace log\n"
    assert load_profile(out / "profiles" / NAME).complete
