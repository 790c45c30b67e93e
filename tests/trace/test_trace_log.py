"""The trace_log sink and the rephase command, on the recorded redis timeline."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import anyio
import pytest

from speaker.config import load_pipeline
from speaker.engine import ExitCode, run_pipeline
from speaker.trace_file import TraceFileError, read_trace
from tests.conftest import DATA, PYTHON

RECORDING = DATA / "timelines" / "redis.jsonl"
NAME = "spk-b-capture-redis"


def trace_recording(tmp_path: Path, detector: str) -> Path:
    """Run the recording through the phase machine into a trace log and profiles; return the directory."""
    pipeline = tmp_path / "trace.toml"
    pipeline.write_text(
        f"""
[sources.recording]
type = "jsonl_replay"
path = "{RECORDING}"

[stages.phases]
type = "phase_machine"
inputs = ["recording"]
detector = {detector}
clock = "events"

[sinks.profiles]
type = "profile_files"
inputs = ["phases"]
directory = "{tmp_path / 'live'}"

[sinks.trace]
type = "trace_log"
inputs = ["phases"]
path = "{tmp_path / 'trace.jsonl'}"
"""
    )
    result = anyio.run(functools.partial(run_pipeline, load_pipeline(pipeline), handle_signals=False))
    assert result.exit_code == ExitCode.OK, result.problems
    return tmp_path


def rephase(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "speaker", "rephase", *arguments], capture_output=True, text=True, timeout=60)


def lists(directory: Path) -> dict[str, set[str]]:
    return {phase: set((directory / phase).read_text().split()) for phase in ("booting", "running", "shutdown")}


def test_trace_log_rows_and_events(tmp_path):
    trace_recording(tmp_path, '{ type = "listen", port = 6379 }')
    lines = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "trace_log"
    assert lines[0]["version"] == 1
    rows = [line for line in lines if line["type"] == "syscall_second"]
    assert {row["phase"] for row in rows} == {"booting", "running", "shutdown"}
    for row in rows:
        assert row["start_time"] >= row["second"]
        assert row["end_time"] >= row["start_time"]
    types = {line["type"] for line in lines}
    assert {"ContainerEvent", "PhaseChange", "ProcessSample", "ContainerOutput"} <= types
    # The recording's calls are all in the rows: compare the totals.
    recorded = sum(
        count
        for line in RECORDING.read_text().splitlines()
        if (event := json.loads(line))["type"] == "SyscallCounts"
        for _key, count in event["counts"]
    )
    written = sum(count for row in rows for names in row["syscalls"].values() for count in names.values())
    assert written == recorded


def test_rephase_same_detector_matches_live(tmp_path):
    trace_recording(tmp_path, '{ type = "listen", port = 6379 }')
    result = rephase(str(tmp_path / "trace.jsonl"), "--detector", '{type="listen", port=6379}', "-o", str(tmp_path / "re"))
    assert result.returncode == 0, result.stderr
    assert lists(tmp_path / "re" / NAME) == lists(tmp_path / "live" / NAME)


def test_rephase_other_detector_moves_boundary(tmp_path):
    trace_recording(tmp_path, '{ type = "listen", port = 6379 }')
    result = rephase(str(tmp_path / "trace.jsonl"), "--detector", "health", "-o", str(tmp_path / "re"))
    assert result.returncode == 0, result.stderr
    profile = json.loads((tmp_path / "re" / NAME / "profile.json").read_text())
    (trace,) = profile["traces"]
    assert trace["detector"] == "health"
    running = [transition for transition in trace["transitions"] if transition["phase"] == "running"]
    assert running[0]["time"] == pytest.approx(1796418088.945, abs=1e-3)
    # Running now starts at the first healthy report, a second after the
    # listen, so the rows of the second in between move to booting. The row
    # of second 088 straddles the new boundary and stays in running.
    live = lists(tmp_path / "live" / NAME)
    health = lists(tmp_path / "re" / NAME)
    assert health["shutdown"] == live["shutdown"]
    assert booting_calls(tmp_path / "re" / NAME) > booting_calls(tmp_path / "live" / NAME)
    assert health["booting"] | health["running"] | health["shutdown"] == live["booting"] | live["running"] | live["shutdown"]


def booting_calls(directory: Path) -> int:
    profile = json.loads((directory / "profile.json").read_text())
    return sum(entry["calls"] for entry in profile["arches"]["x86_64"]["booting"])


def test_rephase_timeout_is_incomplete(tmp_path):
    trace_recording(tmp_path, '{ type = "listen", port = 6379 }')
    result = rephase(
        str(tmp_path / "trace.jsonl"), "--detector", "{type='listen', port=1}", "--ready-timeout", "5s", "-o", str(tmp_path / "re")
    )
    assert result.returncode == ExitCode.INCOMPLETE
    assert "did not find the container ready within 5s" in result.stderr
    assert not lists(tmp_path / "re" / NAME)["running"]


@pytest.mark.parametrize(
    ("detector", "message"),
    [
        ("lisen", "did you mean 'listen'"),
        ("{type='delay'}", "missing required option"),
        ("{type=", "invalid TOML inline table"),
    ],
)
def test_rephase_rejects_bad_detector(tmp_path, detector, message):
    result = rephase(str(RECORDING), "--detector", detector, "-o", str(tmp_path))
    assert result.returncode == ExitCode.USAGE
    assert message in result.stderr


def test_rephase_rejects_other_files(tmp_path):
    result = rephase(str(RECORDING), "--detector", "window", "-o", str(tmp_path))
    assert result.returncode == ExitCode.USAGE
    assert f"{RECORDING}:1: not a trace log" in result.stderr
    with pytest.raises(TraceFileError, match="cannot open"):
        list(read_trace(tmp_path / "missing.jsonl"))


TRACE = DATA / "profiles" / "redis-1-trace.jsonl"
# Line 10 of TRACE is its first syscall row, of the booting second.
ROW_LINE = 10


def edited_trace(tmp_path: Path, edit) -> Path:
    """Copy TRACE with ``edit`` applied to the bytes of its first syscall row; return the copy."""
    lines = TRACE.read_bytes().split(b"\n")
    lines[ROW_LINE - 1] = edit(lines[ROW_LINE - 1])
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path


def set_fields(**values: str):
    """Return an edit that replaces the JSON values of row fields with raw JSON text, such as NaN."""

    def edit(line: bytes) -> bytes:
        row = json.loads(line)
        for key in values:
            row[key] = f"@{key}@"
        text = json.dumps(row)
        for key, raw in values.items():
            text = text.replace(f'"@{key}@"', raw)
        return text.encode()

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_fields(start_time="NaN"), "start_time must be a finite time in seconds, got NaN"),
        (set_fields(end_time="Infinity"), "end_time must be a finite time in seconds, got Infinity"),
        (
            set_fields(second="1e30", start_time="1e30", end_time="1e30"),
            "start_time must be seconds since the epoch from 0 to 253402300799 (the end of the year 9999), got 1e+30",
        ),
        (set_fields(end_time="1796415715.0"), "end_time 1796415715.0 is before start_time 1796415715.8000002"),
        (set_fields(second="1796415999"), "second must be the whole second of start_time, 1796415715, got 1796415999"),
        (lambda line: line.replace(b'"access":1', b'"access":-1'), "the count of 'access' on 'x86_64' must be a whole number"),
        (lambda line: line.replace(b"booting", b"boot\xffing", 1), "byte 141 is not UTF-8 text (0xff)"),
        (lambda line: b"[" * 100_000, "invalid JSON: arrays or objects are nested too deeply"),
    ],
    ids=["nan", "infinity", "1e30", "end-before-start", "second", "negative-count", "not-utf8", "nested"],
)
def test_rephase_rejects_bad_row(tmp_path, edit, message):
    trace = edited_trace(tmp_path, edit)
    result = rephase(str(trace), "--detector", '{type="delay", after="1s"}', "-o", str(tmp_path / "out"))
    assert result.returncode == ExitCode.USAGE, result.stdout
    assert f"error: {trace}:{ROW_LINE}: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_trace_rejects_nan_event_time(tmp_path):
    lines = TRACE.read_text().splitlines()
    # Line 3 is the container's start event.
    lines[2] = lines[2].replace('"event_time":1796415715.919587', '"event_time":NaN')
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFileError, match=r":3: invalid trace line: event_time must be a finite time in seconds, got NaN"):
        list(read_trace(path))


def test_trace_skips_byte_order_mark(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + TRACE.read_bytes())
    assert len(list(read_trace(path))) == len(list(read_trace(TRACE)))


def test_rephase_without_rows_is_incomplete(tmp_path):
    # The header and the lifecycle and phase events, cut before the first syscall row.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(TRACE.read_text().splitlines(keepends=True)[: ROW_LINE - 1]))
    result = rephase(str(cut), "--detector", '{type="delay", after="1s"}', "-o", str(tmp_path / "out"))
    assert result.returncode == ExitCode.INCOMPLETE, result.stderr
    directory = tmp_path / "out" / "spk-c-capture-redis"
    profile = json.loads((directory / "profile.json").read_text())
    assert profile["complete"] is False
    for phase in ("booting", "running", "shutdown"):
        assert f"the {phase} list is empty although the phase began" in result.stderr
        assert any(f"the {phase} list is empty" in problem for problem in profile["problems"])
    # profile show accepts what rephase wrote, because it is marked incomplete.
    show = subprocess.run(
        [PYTHON, "-m", "speaker", "profile", "show", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert show.returncode == 0, show.stderr
    assert "Complete: NO" in show.stdout


def test_rephase_output_is_a_file(tmp_path):
    target = tmp_path / "existing"
    target.write_text("")
    result = rephase(str(TRACE), "--detector", "window", "-o", str(target))
    assert result.returncode == ExitCode.USAGE
    assert f"error: {target}: is a file, not a directory" in result.stderr
