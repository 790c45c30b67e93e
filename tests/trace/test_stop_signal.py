"""The shutdown boundary on a real nginx trace with the stop signal rule loaded (tests/data/stop, made by capture.sh there).

The times and syscalls below were read off the recording by hand; the
README in that directory lists them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import structlog

from speaker.audit.chunks import ChunkParser
from speaker.audit.serials import SerialTracker
from speaker.detectors import parse_detector
from speaker.events import Event, Phase, PhaseChange, SignalRecord, SyscallCounts, event_from_dict
from speaker.phase_tracker import PhaseMachine, PhaseSettings
from tests.conftest import DATA, PYTHON
from tests.sources.audit_reference import netlink_lines

STOP = DATA / "stop"
CONTAINER = "cf73225eb8298f728ee92df76749e63fc9f771f7701b6d587d1bc25bd69d0478"
NAME = "spk-g-capture-nginx"
INIT_PID = 17996
#: Kernel time of runc's kill(17996, SIGTERM), and the time of Docker's kill event.
SIGNAL_TIME = 1796423255.441
DOCKER_KILL_TIME = 1796423255.4532933
#: nginx's calls after the signal, all between 1796423255.441 and 1796423255.445.
SHUTDOWN_ONLY = {"exit_group", "wait4", "unlink", "rt_sigsuspend", "setitimer", "recvmsg", "munmap", "futex", "brk"}
LISTEN = {"type": "listen", "port": 80}


def load(*, signals: bool = True) -> list[Event]:
    with (STOP / "timeline.jsonl").open() as handle:
        events = [event_from_dict(json.loads(line)) for line in handle if line.strip()]
    return [event for event in events if signals or not isinstance(event, SignalRecord)]


def replay(events: list[Event]) -> list[Event]:
    """Feed a recording through the phase machine in file order, as the stage does with clock = "events"."""
    machine = PhaseMachine(PhaseSettings(parse_detector(LISTEN), 120.0, 1.0), structlog.get_logger("test"))
    out: list[Event] = []
    for event in events:
        out.extend(machine.feed(event))
        if not isinstance(event, SyscallCounts):
            out.extend(machine.advance(machine.latest))
    out.extend(machine.finish())
    return out


def phase_lists(out: list[Event]) -> dict[Phase, set[str]]:
    lists: dict[Phase, set[str]] = {phase: set() for phase in Phase}
    for event in out:
        if isinstance(event, SyscallCounts):
            assert event.phase is not None
            lists[event.phase].update(key.name for key in event.counts)
    return lists


def shutdown_change(out: list[Event]) -> PhaseChange:
    (change,) = [event for event in out if isinstance(event, PhaseChange) and event.phase == Phase.SHUTDOWN]
    return change


def test_recording_has_kernel_signal_before_docker_kill():
    (signal,) = [event for event in load() if isinstance(event, SignalRecord)]
    assert signal.container_id == CONTAINER
    assert (signal.pid, signal.signal, signal.syscall, signal.sender_comm) == (INIT_PID, 15, "kill", "runc")
    assert signal.from_container is False
    assert signal.record_time == SIGNAL_TIME
    assert SIGNAL_TIME < DOCKER_KILL_TIME


def test_kernel_signal_starts_shutdown():
    out = replay(load())
    change = shutdown_change(out)
    assert change.detector == "signal"
    assert change.start_time == SIGNAL_TIME
    lists = phase_lists(out)
    assert SHUTDOWN_ONLY <= lists[Phase.SHUTDOWN]
    assert not SHUTDOWN_ONLY & lists[Phase.RUNNING]


def test_docker_kill_alone_misses_shutdown():
    # Without the kernel's record, the boundary is Docker's kill event,
    # 12 ms late: nginx had finished by then, so its shutdown lands in running.
    out = replay(load(signals=False))
    change = shutdown_change(out)
    assert change.detector == "kill"
    assert change.start_time == DOCKER_KILL_TIME
    lists = phase_lists(out)
    assert lists[Phase.SHUTDOWN] == set()
    assert SHUTDOWN_ONLY <= lists[Phase.RUNNING]


def test_straddling_key_lands_in_both_phases():
    # The last count covers .433 to .445; its close calls span the signal at .441.
    out = replay(load())
    pieces = [
        event
        for event in out
        if isinstance(event, SyscallCounts) and any(key.name == "close" for key in event.counts) and event.end_time >= SIGNAL_TIME
    ]
    assert {piece.phase for piece in pieces} == {Phase.RUNNING, Phase.SHUTDOWN}
    closes = {piece.phase: count for piece in pieces for key, count in piece.counts.items() if key.name == "close"}
    assert closes == {Phase.RUNNING: 7, Phase.SHUTDOWN: 1}
    lists = phase_lists(out)
    assert "close" in lists[Phase.RUNNING] & lists[Phase.SHUTDOWN]
    # Calls only before the signal stay in running.
    assert "accept4" not in lists[Phase.SHUTDOWN]


def test_calls_in_signal_tick_land_in_both_phases():
    # rt_sigreturn and sendmsg were first called at .441, the kernel clock
    # tick of the kill, so they may have come just before it.
    lists = phase_lists(replay(load()))
    for name in ("rt_sigreturn", "sendmsg"):
        assert name in lists[Phase.RUNNING]
        assert name in lists[Phase.SHUTDOWN]


def test_raw_stream_gives_the_same_signal():
    text = netlink_lines(STOP / "netlink.bin.gz")
    for size in (len(text), 20000, 3000):
        parser = ChunkParser(SerialTracker(grace=0.0))
        signals = []
        start = 0
        while start < len(text):
            end = text.find(b"\n", min(start + size, len(text) - 1)) + 1 or len(text)
            signals += parser.parse(text[start:end]).signals
            start = end
        assert [(s.syscall, s.signal, s.sender_comm, s.sender_pid, s.pid, s.comm, s.time, s.serial) for s in signals] == [
            ("kill", 15, "runc", 18087, INIT_PID, "nginx", SIGNAL_TIME, 54265788)
        ], size
        assert parser.tracker.confirm(final=True) == {}


def test_rephase_keeps_kernel_boundary(tmp_path: Path):
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "rephase", str(STOP / "trace.jsonl"), "--detector", '{type="listen", port=80}', "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / NAME
    lists = {phase: set((directory / phase).read_text().split()) for phase in ("booting", "running", "shutdown")}
    live = phase_lists(replay(load()))
    assert lists == {phase.value: names for phase, names in live.items()}
    (trace,) = json.loads((directory / "profile.json").read_text())["traces"]
    shutdown = [transition for transition in trace["transitions"] if transition["phase"] == "shutdown"]
    assert [(transition["time"], transition["detector"]) for transition in shutdown] == [(SIGNAL_TIME, "signal")]
