"""Phases and detectors on timelines recorded from real traces (tests/data/timelines, made by capture.sh there).

The expected times were read off the recordings by hand: the first process
sample that lists port 6379, the "Ready to accept connections" line, Docker's
health_status and kill events, and the per-second syscall sets printed from
the SyscallCounts events.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import anyio
import pytest
import structlog

from speaker.config import load_pipeline
from speaker.detectors import parse_detector
from speaker.engine import ExitCode, run_pipeline
from speaker.events import Event, Phase, PhaseChange, SyscallCounts, TraceIncomplete, event_from_dict
from speaker.phase_tracker import PhaseMachine, PhaseSettings
from tests.conftest import DATA

TIMELINES = DATA / "timelines"
REDIS = "eb55644009c3"  # redis.jsonl: health check every 1 s, idle 8 s after it listens, then stopped
FIRST = "ea828e5c6b7b"  # two.jsonl: spk-b-capture-two-1
SECOND = "ea0790fa7b1b"  # two.jsonl: spk-b-capture-two-2
EXITED = "88bf8ef9bfd7"  # exit-booting.jsonl: redis with an invalid port, exit code 1


def load(name: str) -> list[Event]:
    with (TIMELINES / name).open() as handle:
        return [event_from_dict(json.loads(line)) for line in handle if line.strip()]


def replay(name: str, detector: object, ready_timeout: float = 120.0) -> list[Event]:
    """Feed a recording through the phase machine in file order, as the stage does with clock = "events"."""
    machine = PhaseMachine(PhaseSettings(parse_detector(detector), ready_timeout, 1.0), structlog.get_logger("test"))
    out: list[Event] = []
    for event in load(name):
        out.extend(machine.feed(event))
        if not isinstance(event, SyscallCounts):
            out.extend(machine.advance(machine.latest))
    out.extend(machine.finish())
    return out


def running_start(out: list[Event], container: str) -> PhaseChange:
    changes = [e for e in out if isinstance(e, PhaseChange) and e.container_id.startswith(container)]
    running = [change for change in changes if change.phase == Phase.RUNNING]
    assert len(running) == 1, changes
    return running[0]


def phase_lists(out: list[Event], container: str) -> dict[Phase, set[str]]:
    lists: dict[Phase, set[str]] = {phase: set() for phase in Phase}
    for event in out:
        if isinstance(event, SyscallCounts) and event.container_id.startswith(container):
            assert event.phase is not None
            lists[event.phase].update(key.name for key in event.counts)
    return lists


@pytest.mark.parametrize(
    ("detector", "expected", "name"),
    [
        ({"type": "listen", "port": 6379}, 1796418087.888, "listen"),
        ({"type": "log", "pattern": "Ready to accept connections"}, 1796418087.882, "log"),
        ("health", 1796418088.945, "health"),
        ({"type": "delay", "after": "5s"}, 1796418092.835, "delay"),
        # All five tasks sleep in epoll_wait (232) or futex (202) from the
        # first sample on, 1796418087.888 at 2 CPU ticks. The sample at
        # 089.887 is only 1.999 s later. The next one, 090.384, has 4 ticks,
        # so 0.02 CPU seconds in 2.496 s, which is below 2% of a CPU.
        ({"type": "quiescence", "duration": "2s", "max_cpu": 0.02}, 1796418090.384, "quiescence"),
        ({"any": [{"type": "delay", "after": "5s"}, "health"]}, 1796418088.945, "health"),
        ({"all": [{"type": "delay", "after": "5s"}, "health"]}, 1796418092.835, "delay"),
    ],
)
def test_detector_on_redis_recording(detector, expected, name):
    out = replay("redis.jsonl", detector)
    change = running_start(out, REDIS)
    assert change.detector == name
    assert change.start_time == pytest.approx(expected, abs=1e-3)
    assert not [event for event in out if isinstance(event, TraceIncomplete)]


def test_window_on_two_recording():
    # Per-second sets of the first container (started at 203.76): second 203
    # has 54 syscalls, then 204 to 210 are {close, epoll_wait, openat, read},
    # so the fourth equal second ends at 208. The second container started
    # at 205.41; its seconds 206 to 211 have that set, so its window ends at 210.
    out = replay("two.jsonl", "window")
    assert running_start(out, FIRST).start_time == 1796418208.0
    assert running_start(out, SECOND).start_time == 1796418210.0


def test_redis_recording_phases():
    out = replay("redis.jsonl", {"type": "listen", "port": 6379})
    lists = phase_lists(out, REDIS)
    assert {"execve", "bind", "listen"} <= lists[Phase.BOOTING]
    assert "accept4" in lists[Phase.RUNNING]  # the health check's connections
    assert "exit_group" in lists[Phase.SHUTDOWN]
    assert "execve" not in lists[Phase.SHUTDOWN]
    shutdown = [e for e in out if isinstance(e, PhaseChange) and e.phase == Phase.SHUTDOWN]
    assert len(shutdown) == 1
    assert shutdown[0].start_time == pytest.approx(1796418095.982, abs=1e-3)
    assert shutdown[0].detector == "kill"


def test_detector_timeout_keeps_booting():
    # Nothing listens on port 1, so the listen detector never fires.
    out = replay("redis.jsonl", {"type": "listen", "port": 1}, ready_timeout=5.0)
    incomplete = [event for event in out if isinstance(event, TraceIncomplete)]
    assert [event.reason for event in incomplete] == ["detector_timeout"]
    assert "within 5s" in incomplete[0].detail
    phases = [e.phase for e in out if isinstance(e, PhaseChange)]
    assert phases == [Phase.BOOTING, Phase.SHUTDOWN]
    lists = phase_lists(out, REDIS)
    assert not lists[Phase.RUNNING]
    assert {"execve", "accept4"} <= lists[Phase.BOOTING]
    assert "exit_group" in lists[Phase.SHUTDOWN]


def test_exit_while_booting_recording():
    out = replay("exit-booting.jsonl", {"type": "listen", "port": 6379})
    incomplete = [event for event in out if isinstance(event, TraceIncomplete)]
    assert [event.reason for event in incomplete] == ["exited_while_booting"]
    assert "code 1" in incomplete[0].detail
    lists = phase_lists(out, EXITED)
    assert {"execve", "exit_group"} <= lists[Phase.BOOTING]
    assert not lists[Phase.RUNNING]
    assert not lists[Phase.SHUTDOWN]


def _replay_pipeline(tmp_path: Path, recording: str, detector: str) -> Path:
    pipeline = tmp_path / "replay.toml"
    pipeline.write_text(
        f"""
[sources.recording]
type = "jsonl_replay"
path = "{TIMELINES / recording}"

[stages.phases]
type = "phase_machine"
inputs = ["recording"]
detector = {detector}
clock = "events"

[sinks.profiles]
type = "profile_files"
inputs = ["phases"]
directory = "{tmp_path / 'profiles'}"
"""
    )
    return pipeline


def test_two_containers_get_separate_profiles(tmp_path):
    spec = load_pipeline(_replay_pipeline(tmp_path, "two.jsonl", '{ type = "listen", port = 6379 }'))
    result = anyio.run(functools.partial(run_pipeline, spec, handle_signals=False))
    assert result.exit_code == ExitCode.OK, result.problems
    directories = sorted(path.name for path in (tmp_path / "profiles").iterdir())
    assert directories == ["spk-b-capture-two-1", "spk-b-capture-two-2"]
    for name in directories:
        profile = json.loads((tmp_path / "profiles" / name / "profile.json").read_text())
        (trace,) = profile["traces"]
        assert trace["container_name"] == name
        assert trace["complete"] is True
        for phase in ("booting", "running", "shutdown"):
            assert (tmp_path / "profiles" / name / phase).read_text().split(), f"{name}: empty {phase}"
    first = json.loads((tmp_path / "profiles" / "spk-b-capture-two-1" / "profile.json").read_text())
    second = json.loads((tmp_path / "profiles" / "spk-b-capture-two-2" / "profile.json").read_text())
    assert first["traces"][0]["container_id"].startswith(FIRST)
    assert second["traces"][0]["container_id"].startswith(SECOND)
