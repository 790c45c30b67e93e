"""Readiness detectors and their pipeline-file form, on hand-written events."""

from __future__ import annotations

import pytest

from speaker.detectors import parse_detector
from speaker.detectors.quiescence import CLOCK_TICKS
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    ContainerOutput,
    ProcessSample,
    SyscallCounts,
    SyscallKey,
    TaskSample,
)
from speaker.options import OptionError

T0 = 1_800_000_000.0


def create(value: object, started_at: float = T0):
    return parse_detector(value).create(started_at)


def counts_at(second: float, *names: str) -> SyscallCounts:
    keys = {SyscallKey(0, "x86_64", index, name): 1 for index, name in enumerate(names)}
    return SyscallCounts(start_time=T0 + second, end_time=T0 + second + 0.05, counts=keys)


# --- Parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "described"),
    [
        ("window", "window()"),
        ({"type": "window", "seconds": 6}, "window(seconds=6)"),
        ({"type": "listen", "port": 6379}, "listen(port=6379)"),
        ({"any": [{"type": "listen", "port": 80}, {"type": "delay", "after": "30s"}]}, 'any(listen(port=80), delay(after="30s"))'),
        ({"all": ["health", {"any": ["quiescence", {"type": "log", "pattern": "ready"}]}]}, 'all(health(), any(quiescence(), log(pattern="ready")))'),
    ],
)
def test_parse_valid_forms(value, described):
    assert parse_detector(value).describe() == described


@pytest.mark.parametrize(
    ("value", "key_path", "message"),
    [
        ("lisen", "", "did you mean 'listen'"),
        ({"type": "lisen"}, ".type", "did you mean 'listen'"),
        ({"type": "delay"}, ".after", "missing required option"),
        ({"type": "listen", "prot": 80}, ".prot", "did you mean 'port'"),
        ({"type": "listen", "port": 70000}, ".port", "above the maximum"),
        ({"any": [{"type": "delay", "after": "soon"}]}, ".any[0].after", "invalid duration"),
        ({"any": []}, ".any", "non-empty list"),
        ({"any": ["window"], "all": ["window"]}, "", "exactly one key"),
        ({"type": "log", "pattern": "("}, ".pattern", "invalid regular expression"),
        ({"port": 80}, "", "missing 'type'"),
        ("any", "", "is a combinator"),
        (3, "", "a detector is a type name"),
    ],
)
def test_parse_errors_name_key(value, key_path, message):
    with pytest.raises(OptionError) as caught:
        parse_detector(value)
    assert caught.value.key_path == key_path
    assert message in str(caught.value)


# --- Each detector -----------------------------------------------------------


def test_window_fires_after_equal_small_sets():
    detector = create({"type": "window", "seconds": 3, "max_syscalls": 3})
    busy = ("openat", "read", "mmap", "close")
    for event in [counts_at(0.1, *busy), counts_at(1.1, "epoll_wait", "read")]:
        assert detector.observe(event) is None
    for second in (2, 3):
        detector.observe(counts_at(second + 0.1, "epoll_wait", "read"))
    # Slot 3 is complete only once time reaches 4.0.
    assert detector.advance(T0 + 3.99) is None
    readiness = detector.advance(T0 + 4.0)
    assert readiness is not None
    assert readiness.time == T0 + 4.0
    assert readiness.detector == "window"
    assert "3 seconds with 2 distinct syscalls" in readiness.reason


def test_window_ignores_large_sets():
    detector = create({"type": "window", "seconds": 2, "max_syscalls": 2})
    for second in range(5):
        detector.observe(counts_at(second + 0.5, "epoll_wait", "read"))
    assert detector.advance(T0 + 5) is None


def test_window_uses_spans_across_seconds():
    # One count from 0.9 to 2.05: booting's openat calls end at 0.95, and only
    # epoll_wait goes on into seconds 1 and 2. Without spans, openat would
    # fill those seconds too.
    keys = {SyscallKey(0, "x86_64", 257, "openat"): 5, SyscallKey(0, "x86_64", 232, "epoll_wait"): 9}
    spans = {
        SyscallKey(0, "x86_64", 257, "openat"): (T0 + 0.9, T0 + 0.95),
        SyscallKey(0, "x86_64", 232, "epoll_wait"): (T0 + 0.9, T0 + 2.05),
    }
    detector = create({"type": "window", "seconds": 2})
    detector.observe(SyscallCounts(start_time=T0 + 0.9, end_time=T0 + 2.05, counts=keys, spans=spans))
    readiness = detector.advance(T0 + 3.0)
    assert readiness is not None
    assert readiness.time == T0 + 3.0  # seconds 1 and 2 hold {epoll_wait}


def test_window_counts_empty_seconds():
    detector = create({"type": "window", "seconds": 3})
    detector.observe(counts_at(0.5, "execve", "openat"))
    readiness = detector.advance(T0 + 10)
    assert readiness is not None
    assert readiness.time == T0 + 4.0  # slots 1, 2 and 3 are empty


def test_health_fires_on_healthy():
    detector = create("health")
    starting = ContainerEvent(action=ContainerAction.HEALTH_STATUS, health="starting", event_time=T0 + 1)
    healthy = ContainerEvent(action=ContainerAction.HEALTH_STATUS, health="healthy", event_time=T0 + 5)
    assert detector.observe(starting) is None
    readiness = detector.observe(healthy)
    assert readiness is not None
    assert readiness.time == T0 + 5


def test_listen_port_and_any_port():
    sample = ProcessSample(tasks=(), listening_ports=(5432,), wall_time=T0 + 2)
    assert create({"type": "listen", "port": 6379}).observe(sample) is None
    readiness = create("listen").observe(sample)
    assert readiness is not None
    assert readiness.reason == "TCP port 5432 is in LISTEN"


def test_log_matches_stream():
    detector = create({"type": "log", "pattern": r"ready to accept", "stream": "stderr"})
    line = "database system is ready to accept connections"
    assert detector.observe(ContainerOutput(stream="stdout", line=line, wall_time=T0 + 1)) is None
    readiness = detector.observe(ContainerOutput(stream="stderr", line=line, wall_time=T0 + 2))
    assert readiness is not None
    assert readiness.time == T0 + 2


def test_delay_fires_at_start_plus_after():
    detector = create({"type": "delay", "after": "5s"}, started_at=T0 + 1)
    assert detector.advance(T0 + 5.9) is None
    readiness = detector.advance(T0 + 7)
    assert readiness is not None
    assert readiness.time == T0 + 6


def _tasks(state: str, syscall: int | None, ticks: int) -> tuple[TaskSample, ...]:
    return (TaskSample(pid=1, tid=1, comm="server", state=state, syscall=syscall, cpu_ticks=ticks),)


def test_quiescence_needs_idle_cpu_and_waiting_tasks():
    detector = create({"type": "quiescence", "duration": "2s", "max_cpu": 0.05})
    busy_ticks = int(CLOCK_TICKS)  # one CPU second within one second: busy

    def sample(at: float, state: str, syscall: int | None, ticks: int) -> ProcessSample:
        return ProcessSample(tasks=_tasks(state, syscall, ticks), cpu_ticks=ticks, wall_time=T0 + at)

    assert detector.observe(sample(0, "S", 232, 100)) is None
    assert detector.observe(sample(1, "S", 232, 100 + busy_ticks)) is None  # CPU busy: restart
    assert detector.observe(sample(2, "R", None, 100 + busy_ticks)) is None  # running: restart
    assert detector.observe(sample(3, "S", 232, 100 + busy_ticks)) is None
    assert detector.observe(sample(4, "S", 232, 100 + busy_ticks)) is None
    readiness = detector.observe(sample(5, "S", 232, 100 + busy_ticks))
    assert readiness is not None
    assert readiness.time == T0 + 5


def test_all_fires_at_latest_child():
    detector = create({"all": [{"type": "delay", "after": "1s"}, {"type": "listen", "port": 80}]})
    assert detector.advance(T0 + 2) is None
    readiness = detector.observe(ProcessSample(tasks=(), listening_ports=(80,), wall_time=T0 + 3))
    assert readiness is not None
    assert readiness.time == T0 + 3
    assert readiness.detector == "listen"


def test_nested_combinator_receives_events():
    detector = create({"any": [{"all": ["health", {"type": "listen", "port": 80}]}, {"type": "delay", "after": "1h"}]})
    assert detector.observe(ProcessSample(tasks=(), listening_ports=(80,), wall_time=T0 + 1)) is None
    healthy = ContainerEvent(action=ContainerAction.HEALTH_STATUS, health="healthy", event_time=T0 + 2)
    readiness = detector.observe(healthy)
    assert readiness is not None
    assert readiness.time == T0 + 2
