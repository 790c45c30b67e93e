"""``speaker report`` on a real trace: the printed phase boundaries and the PNG/SVG timeline."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DATA, PYTHON, ROOT

TRACE = DATA / "profiles" / "redis-1-trace.jsonl"
EVENTS = DATA / "profiles" / "redis-1-events.jsonl"


def speaker(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    command = [PYTHON, "-c", code, *args] if code else [PYTHON, "-m", "speaker", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def expected_offsets(trace: Path) -> dict[str, float]:
    """Read the phase starts straight from the trace lines, relative to the container's start event."""
    lines = [json.loads(line) for line in trace.read_text().splitlines()[1:]]
    started = next(line["event_time"] for line in lines if line["type"] == "ContainerEvent" and line["action"] == "start")
    return {line["phase"]: line["start_time"] - started for line in lines if line["type"] == "PhaseChange"}


def printed_offsets(output: str) -> dict[str, float]:
    return {phase: float(offset) for phase, offset in re.findall(r"^\s+(booting|running|shutdown)\s+at\s+([+-][\d.]+) s", output, re.MULTILINE)}


def test_report_draws_three_phases(tmp_path: Path) -> None:
    result = speaker("report", str(TRACE), "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    offsets = printed_offsets(result.stdout)
    assert list(offsets) == ["booting", "running", "shutdown"]
    for phase, offset in expected_offsets(TRACE).items():
        assert offsets[phase] == pytest.approx(offset, abs=0.001), phase
    png = tmp_path / "spk-c-capture-redis.png"
    svg = tmp_path / "spk-c-capture-redis.svg"
    assert png_size(png) == (1200, 700)
    assert png.stat().st_size > 20_000
    assert svg.stat().st_size > 20_000
    svg_text = svg.read_text()
    for label in ("booting (start)", "running (log)", "shutdown (stop)"):
        assert label in svg_text


def test_report_totals_match_trace() -> None:
    result = speaker("report", str(TRACE), "--no-plot")
    rows = {match[0]: int(match[1].replace(",", "")) for match in re.findall(r"^\s+(booting|running|shutdown)\s+\S+\s+\S+\s+([\d,]+)", result.stdout, re.MULTILINE)}
    lines = [json.loads(line) for line in TRACE.read_text().splitlines()[1:]]
    for phase in ("booting", "running", "shutdown"):
        counted = sum(
            sum(sum(names.values()) for names in line["syscalls"].values())
            for line in lines
            if line["type"] == "syscall_second" and line["phase"] == phase
        )
        assert rows[phase] == counted, phase


def test_report_reads_jsonl_events(tmp_path: Path) -> None:
    from_events = printed_offsets(speaker("report", str(EVENTS), "--no-plot").stdout)
    from_trace = printed_offsets(speaker("report", str(TRACE), "--no-plot").stdout)
    assert from_events == from_trace


def test_report_without_matplotlib(tmp_path: Path) -> None:
    code = "import sys; sys.modules['matplotlib'] = None; from speaker.cli import main; sys.exit(main(sys.argv[1:]))"
    result = speaker("report", str(TRACE), "-o", str(tmp_path), code=code)
    assert result.returncode == 0, result.stderr
    assert "matplotlib is not installed" in result.stderr
    assert "running   at" in result.stdout
    assert not list(tmp_path.iterdir())


def test_report_rejects_non_trace(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    result = speaker("report", str(path))
    assert result.returncode == 2
    assert f"{path}:1:" in result.stderr


def test_report_on_pipeline_trace(tmp_path: Path) -> None:
    trace = DATA / "profiles" / "redis-pipeline-trace.jsonl"
    result = speaker("report", str(trace), "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    offsets = printed_offsets(result.stdout)
    assert list(offsets) == ["booting", "running", "shutdown"]
    for phase, offset in expected_offsets(trace).items():
        assert offsets[phase] == pytest.approx(offset, abs=0.001), phase
    assert "(listen: TCP port 6379 is in LISTEN)" in result.stdout
    assert "12 syscall records were lost" in result.stdout
    assert png_size(tmp_path / "spk-c-e2e-redis.png") == (1200, 700)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"start_time":1796415715.8000002', '"start_time":NaN', "start_time must be a finite time in seconds, got NaN"),
        (
            '"second":1796415715,"phase":"booting","start_time":1796415715.8000002,"end_time":1796415716.0',
            '"second":1e30,"phase":"booting","start_time":1e30,"end_time":1e30',
            "start_time must be seconds since the epoch from 0 to 253402300799",
        ),
    ],
    ids=["nan", "1e30"],
)
def test_report_rejects_impossible_times(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = TRACE.read_text()
    assert old in text
    path = tmp_path / "trace.jsonl"
    path.write_text(text.replace(old, new, 1))
    result = speaker("report", str(path), "--no-plot")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # Line 10 is the first syscall row.
    assert f"error: {path}:10: invalid trace line: {message}" in result.stderr


def test_report_blames_missing_header(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(TRACE.read_text().splitlines(keepends=True)[1:]))
    result = speaker("report", str(path), "--no-plot")
    assert result.returncode == 2
    assert f"error: {path}:1: not a trace log: the first line must be the trace_log header" in result.stderr
    # Line 9 of the cut file is the first syscall row.
    assert "line 9 is a syscall row" in result.stderr


def test_report_names_line_of_bad_byte(tmp_path: Path) -> None:
    for name, line in (("header.jsonl", 1), ("row.jsonl", 10)):
        lines = TRACE.read_bytes().split(b"\n")
        lines[line - 1] = lines[line - 1].replace(b"trace_log" if line == 1 else b"booting", b"\xff", 1)
        path = tmp_path / name
        path.write_bytes(b"\n".join(lines))
        result = speaker("report", str(path), "--no-plot")
        assert result.returncode == 2, result.stderr
        assert f"error: {path}:{line}: " in result.stderr
        assert "is not UTF-8 text (0xff)" in result.stderr


def test_report_rejects_nan_in_event_file(tmp_path: Path) -> None:
    lines = EVENTS.read_text().splitlines()
    number, event = next((number, json.loads(line)) for number, line in enumerate(lines, 1) if '"SyscallCounts"' in line)
    lines[number - 1] = lines[number - 1].replace(json.dumps(event["start_time"]), "NaN", 1)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = speaker("report", str(path), "--no-plot")
    assert result.returncode == 2, result.stderr
    assert f"error: {path}:{number}: not a trace line (start_time must be a finite time in seconds, got NaN)" in result.stderr


def test_report_rejects_span_over_limit(tmp_path: Path) -> None:
    # One row moved to 9999-12-31: a dense series up to there would need gigabytes.
    old = '"second":1796415715,"phase":"booting","start_time":1796415715.8000002,"end_time":1796415716.0'
    new = '"second":253402300798,"phase":"booting","start_time":253402300798.5,"end_time":253402300799'
    path = tmp_path / "trace.jsonl"
    path.write_text(TRACE.read_text().replace(old, new, 1))
    result = speaker("report", str(path), "--no-plot")
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: the syscalls of container spk-c-capture-redis span {253402300798 - 1796415716} seconds" in result.stderr
