"""Engine behaviour: backpressure, fan-out, stops, failures and custom components."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from speaker.config import load_pipeline
from speaker.engine import Engine, ExitCode
from tests.conftest import PYTHON, ROOT

COMPONENTS = "tests.core.components"


def write_pipeline(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "speaker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_backpressure_bounds_queue_and_slows_source(tmp_path: Path) -> None:
    # The source sends one event per batch, the edge buffers 4 batches, and
    # the sink takes 10 ms per batch. So the source can be ahead of the sink
    # by at most the buffer, the batch in the sink's hands and one in flight.
    sent_log = tmp_path / "sent.jsonl"
    received_log = tmp_path / "received.jsonl"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[pipeline]
buffer = 4

[sources.src]
type = "{COMPONENTS}:CountingSource"
count = 150
log_path = "{sent_log}"

[sinks.slow]
type = "{COMPONENTS}:SlowSink"
inputs = ["src"]
delay = "10ms"
log_path = "{received_log}"
""",
    )
    spec = load_pipeline(pipeline)
    engine = Engine(spec, handle_signals=False)
    engine.build()
    max_buffered = 0

    async def main() -> None:
        nonlocal max_buffered

        async def watch() -> None:
            nonlocal max_buffered
            while True:
                max_buffered = max(max_buffered, engine.inputs["slow"].statistics().current_buffer_used)
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            result = await engine.run()
            group.cancel_scope.cancel()
        assert result.exit_code == ExitCode.OK

    started = time.monotonic()
    anyio.run(main)
    elapsed = time.monotonic() - started

    sent = read_jsonl(sent_log)
    received = read_jsonl(received_log)
    assert max_buffered <= 4
    assert received[-1]["received"] == 150
    # At any moment, sent - received <= buffer (4) + one in the sink + one in flight.
    for entry in sent:
        done = sum(1 for item in received if item["time"] <= entry["time"])
        assert entry["sent"] - done <= 6, (entry, done)
    # The source was slowed to the sink's pace: 150 batches at 10 ms each.
    assert elapsed >= 1.4


@pytest.mark.parametrize(
    ("codes", "expected"),
    [((3, 1), 1), ((1, 3), 1), ((3, 4), 4), ((4, 1), 1), ((3, 3), 3)],
)
def test_most_severe_problem_sets_exit_code(tmp_path: Path, codes: tuple[int, int], expected: int) -> None:
    # A failure (1) outranks violations (4), which outrank an incomplete result (3).
    sinks = "".join(
        f'\n[sinks.p{index}]\ntype = "tests.core.components:ProblemSink"\ninputs = ["gen"]\ncode = {code}\n'
        for index, code in enumerate(codes)
    )
    pipeline = write_pipeline(tmp_path / "p.toml", f'[sources.gen]\ntype = "synthetic"\ncount = 10\n{sinks}')
    result = run_cli("run", str(pipeline))
    assert result.returncode == expected, result.stderr
    lines = result.stderr.splitlines()
    for code in codes:
        label = "error" if code == 1 else "warning"
        assert f"{label}: p{codes.index(code)}: problem with exit code {code}" in lines


def test_fan_out_to_two_sinks(tmp_path: Path) -> None:
    first = tmp_path / "first.jsonl"
    second = tmp_path / "second.jsonl"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"
count = 5000
batch = 100

[sinks.first]
type = "jsonl"
inputs = ["gen"]
path = "{first}"

[sinks.second]
type = "jsonl"
inputs = ["gen"]
path = "{second}"
""",
    )
    result = run_cli("run", str(pipeline))
    assert result.returncode == 0, result.stderr
    first_events = read_jsonl(first)
    second_events = read_jsonl(second)
    assert len(first_events) == 5000
    assert first_events == second_events
    assert [event["serial"] for event in first_events] == list(range(1, 5001))


def test_sigterm_midstream_flushes_sinks(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"
count = 0
rate = 20000
batch = 50

[stages.keep]
type = "select"
inputs = ["gen"]

[sinks.file]
type = "jsonl"
inputs = ["keep"]
path = "{output}"
""",
    )
    process = subprocess.Popen(
        [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr

    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    emitted = [entry["records"] for entry in logs if entry["event"] == "synthetic_finished"]
    closed = [entry["events"] for entry in logs if entry["event"] == "jsonl_closed"]
    events = read_jsonl(output)
    assert emitted and emitted[0] > 1000
    # Every record the source emitted reached the file, in order, none twice.
    assert len(events) == emitted[0]
    assert closed == [emitted[0]]
    assert [event["serial"] for event in events] == list(range(1, emitted[0] + 1))
    assert any(entry["event"] == "pipeline_stopping" and "SIGTERM" in entry["reason"] for entry in logs)


def test_second_signal_aborts(tmp_path: Path) -> None:
    marker = tmp_path / "teardown.txt"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.stubborn]
type = "{COMPONENTS}:StubbornSource"

[sinks.marker]
type = "{COMPONENTS}:MarkerSink"
inputs = ["stubborn"]
path = "{marker}"
""",
    )
    process = subprocess.Popen(
        [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None, "the first SIGTERM must only ask the stubborn source to stop"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == ExitCode.ABORTED, stderr
    assert marker.read_text() == "teardown ran\n"


def test_failing_stage_flushes_and_names_component(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"
count = 100000
batch = 64

[stages.breaker]
type = "{COMPONENTS}:FailingStage"
inputs = ["gen"]
fail_at = 1000

[sinks.file]
type = "jsonl"
inputs = ["breaker"]
path = "{output}"
""",
    )
    result = run_cli("--log-format", "json", "run", str(pipeline))
    assert result.returncode == ExitCode.FAILED
    assert "error: breaker failed during run: test failure at event 1000" in result.stderr
    events = read_jsonl(output)
    # Events 1..999 passed the stage before it raised, and all reached the file.
    assert [event["serial"] for event in events] == list(range(1, 1000))


def test_custom_stage_by_import_path(tmp_path: Path) -> None:
    output = tmp_path / "top.jsonl"
    result = run_cli(
        "run",
        str(ROOT / "examples" / "top_syscalls" / "pipeline.toml"),
        "--set",
        f"sinks.summary.path={output}",
        env={"PYTHONPATH": str(ROOT / "examples" / "top_syscalls")},
    )
    assert result.returncode == 0, result.stderr
    (summary,) = read_jsonl(output)
    # synthetic cycles through 5 syscall numbers, so 1000 records give 200 each.
    assert summary["type"] == "SyscallTop"
    assert summary["total"] == 1000
    assert summary["top"] == [["x86_64:0", 200], ["x86_64:1", 200], ["x86_64:3", 200]]


def test_custom_stage_by_entry_point(tmp_path: Path) -> None:
    # Install the example package into a private directory with pip, which
    # writes the real entry_points.txt that importlib.metadata discovers.
    target = tmp_path / "site"
    install = subprocess.run(
        [
            PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
            "--target", str(target), str(ROOT / "examples" / "top_syscalls"),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"
count = 500

[stages.top]
type = "top_syscalls"
inputs = ["gen"]
limit = 1

[sinks.file]
type = "jsonl"
inputs = ["top"]
path = "{tmp_path / 'top.jsonl'}"
types = ["SyscallTop"]
""",
    )
    env = {"PYTHONPATH": str(target)}
    listing = run_cli("components", "top_syscalls", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "[stages] top_syscalls" in listing.stdout
    result = run_cli("run", str(pipeline), env=env)
    assert result.returncode == 0, result.stderr
    (summary,) = read_jsonl(tmp_path / "top.jsonl")
    assert summary["top"] == [["x86_64:0", 100]]


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.toml")), ids=lambda path: path.name)
def test_shipped_pipelines_validate(path: Path) -> None:
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_components_lists_schemas() -> None:
    result = run_cli("components", "--json")
    assert result.returncode == 0, result.stderr
    entries = {entry["type"]: entry for entry in json.loads(result.stdout)}
    synthetic = entries["synthetic"]
    assert synthetic["section"] == "sources"
    assert synthetic["emits"] == ["SyscallRecord"]
    count = next(option for option in synthetic["options"] if option["name"] == "count")
    assert count == {
        "name": "count",
        "type": "integer",
        "default": "1000",
        "required": False,
        "help": "Number of records to emit; 0 emits until the pipeline stops.",
    }


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("SPEAKER runs on Linux only")


def test_jsonl_replay_round_trip(tmp_path: Path) -> None:
    recorded = tmp_path / "recorded.jsonl"
    replayed = tmp_path / "replayed.jsonl"
    record = write_pipeline(
        tmp_path / "record.toml",
        f'[sources.gen]\ntype = "synthetic"\ncount = 600\n\n[sinks.out]\ntype = "jsonl"\ninputs = ["gen"]\npath = "{recorded}"\n',
    )
    replay = write_pipeline(
        tmp_path / "replay.toml",
        f'[sources.file]\ntype = "jsonl_replay"\npath = "{recorded}"\n\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["file"]\npath = "{replayed}"\n',
    )
    assert run_cli("run", str(record)).returncode == 0
    result = run_cli("run", str(replay))
    assert result.returncode == 0, result.stderr
    assert replayed.read_text() == recorded.read_text()
    assert len(read_jsonl(replayed)) == 600


def test_jsonl_replay_names_bad_line(tmp_path: Path) -> None:
    recorded = tmp_path / "broken.jsonl"
    recorded.write_text('{"type": "PhaseChange", "container_id": "x", "phase": "running"}\n{"type": "Nope"}\n')
    replay = write_pipeline(
        tmp_path / "replay.toml",
        f'[sources.file]\ntype = "jsonl_replay"\npath = "{recorded}"\n\n[sinks.out]\ntype = "count"\ninputs = ["file"]\n',
    )
    result = run_cli("run", str(replay))
    assert result.returncode == ExitCode.FAILED
    assert f"{recorded}:2: invalid event: unknown event type 'Nope'" in result.stderr


def test_signal_during_setup_tears_down(tmp_path: Path) -> None:
    marker = tmp_path / "teardown.txt"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"

[stages.slow]
type = "{COMPONENTS}:SlowSetupStage"
inputs = ["gen"]
delay = "30s"

[sinks.marker]
type = "{COMPONENTS}:MarkerSink"
inputs = ["slow"]
path = "{marker}"
""",
    )
    process = subprocess.Popen(
        [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Sinks are set up first, so after 1.5 s the marker sink is ready and the
    # slow stage is still in its 30 s setup.
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == ExitCode.ABORTED, stderr
    assert "received SIGTERM during setup" in stderr
    # The sink finished setup before the signal, so it was torn down.
    assert marker.read_text() == "teardown ran\n"


def test_sighup_stops_gracefully(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"
count = 0
rate = 5000

[sinks.file]
type = "jsonl"
inputs = ["gen"]
path = "{output}"
""",
    )
    process = subprocess.Popen(
        [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "received SIGHUP" in stderr
    assert len(read_jsonl(output)) > 0


def test_constructor_failure_names_component(tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f'[sources.gen]\ntype = "synthetic"\n\n[sinks.bad]\ntype = "{COMPONENTS}:BrokenInitSink"\ninputs = ["gen"]\n',
    )
    result = run_cli("run", str(pipeline))
    assert result.returncode == ExitCode.FAILED
    assert "error: bad failed during init: constructor failed on purpose" in result.stderr


def test_failed_setup_keeps_previous_output(tmp_path: Path) -> None:
    output = tmp_path / "events.jsonl"
    output.write_text("previous run\n")
    pipeline = write_pipeline(
        tmp_path / "p.toml",
        f"""
[sources.gen]
type = "synthetic"

[stages.broken]
type = "{COMPONENTS}:SlowSetupStage"
inputs = ["gen"]
fail = true

[sinks.file]
type = "jsonl"
inputs = ["broken"]
path = "{output}"
""",
    )
    result = run_cli("run", str(pipeline))
    assert result.returncode == ExitCode.FAILED
    assert "setup failed on purpose" in result.stderr
    assert output.read_text() == "previous run\n"


def test_jsonl_replay_rejects_non_object(tmp_path: Path) -> None:
    recorded = tmp_path / "broken.jsonl"
    recorded.write_text('{"type": "PhaseChange", "container_id": "x", "phase": "running"}\n[1, 2, 3]\n\xff\n')
    output = tmp_path / "out.jsonl"
    replay = write_pipeline(
        tmp_path / "replay.toml",
        f'[sources.file]\ntype = "jsonl_replay"\npath = "{recorded}"\n\n'
        f'[sinks.out]\ntype = "jsonl"\ninputs = ["file"]\npath = "{output}"\n',
    )
    result = run_cli("run", str(replay))
    assert result.returncode == ExitCode.FAILED
    assert f"{recorded}:2: invalid event: an event must be a JSON object, got list" in result.stderr
    assert "Traceback" not in result.stderr
    # The valid line before the bad one still reached the sink.
    assert [event["type"] for event in read_jsonl(output)] == ["PhaseChange"]
    skipping = run_cli("run", str(replay), "--set", "sources.file.skip_invalid=true")
    assert skipping.returncode == 0, skipping.stderr
