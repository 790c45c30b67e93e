"""Phase assignment on small hand-written timelines, with the expected phases worked out in each test."""

from __future__ import annotations

import signal

import structlog

from speaker.detectors import parse_detector
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    Phase,
    PhaseChange,
    ProcessSample,
    SignalRecord,
    SyscallCounts,
    SyscallKey,
    TraceIncomplete,
)
from speaker.phase_tracker import PhaseMachine, PhaseSettings

T0 = 1_800_000_000.0
A = "a" * 64
B = "b" * 64


def machine(detector: object = None, timeout: float = 60.0, lag: float = 1.0) -> PhaseMachine:
    spec = parse_detector(detector or {"type": "listen", "port": 6379})
    return PhaseMachine(PhaseSettings(spec, timeout, lag), structlog.get_logger("test"))


def counts(container: str, start: float, end: float, *names: str) -> SyscallCounts:
    keys = {SyscallKey(0, "x86_64", index, name): 1 for index, name in enumerate(names)}
    return SyscallCounts(container_id=container, start_time=T0 + start, end_time=T0 + end, counts=keys)


def lifecycle(container: str, action: ContainerAction, at: float, **fields: object) -> ContainerEvent:
    return ContainerEvent(container_id=container, action=action, event_time=T0 + at, **fields)


def sample(container: str, at: float, *ports: int) -> ProcessSample:
    return ProcessSample(container_id=container, wall_time=T0 + at, tasks=(), listening_ports=ports)


def run_timeline(tracker: PhaseMachine, events: list, advance_to: float | None = None) -> list:
    out = []
    for event in events:
        out.extend(tracker.feed(event))
        out.extend(tracker.advance(T0 + (advance_to if advance_to is not None else 0.0)))
    out.extend(tracker.finish())
    return out


def phases_of(out: list, container: str = A) -> dict[Phase, set[str]]:
    found: dict[Phase, set[str]] = {}
    for event in out:
        if isinstance(event, SyscallCounts) and event.container_id == container:
            assert event.phase is not None
            found.setdefault(event.phase, set()).update(key.name for key in event.counts)
    return found


def changes(out: list, container: str = A) -> list[tuple[Phase, str, float]]:
    return [
        (event.phase, event.detector, round(event.start_time - T0, 3))
        for event in out
        if isinstance(event, PhaseChange) and event.container_id == container
    ]


def test_three_phases_with_straddling_intervals():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            counts(A, -0.5, -0.4, "prctl"),  # runc init, before Docker's start event
            lifecycle(A, ContainerAction.START, 0.0, pid=10),
            counts(A, 0.1, 0.2, "execve"),
            counts(A, 1.9, 2.1, "bind"),  # straddles readiness at 2.0
            sample(A, 2.0, 6379),
            counts(A, 3.0, 3.1, "epoll_wait"),
            lifecycle(A, ContainerAction.KILL, 5.0, signal=signal.SIGTERM, stop_signal=signal.SIGTERM),
            counts(A, 4.95, 5.05, "accept4"),  # straddles the stop at 5.0
            counts(A, 5.1, 5.2, "unlink"),
            lifecycle(A, ContainerAction.DIE, 5.3, exit_code=0),
        ],
    )
    assert phases_of(out) == {
        Phase.BOOTING: {"prctl", "execve"},
        Phase.RUNNING: {"bind", "epoll_wait", "accept4"},
        Phase.SHUTDOWN: {"unlink"},
    }
    assert changes(out) == [
        (Phase.BOOTING, "start", 0.0),
        (Phase.RUNNING, "listen", 2.0),
        (Phase.SHUTDOWN, "kill", 5.0),
    ]
    assert not [event for event in out if isinstance(event, TraceIncomplete)]


def test_kill_with_other_signal_keeps_running():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0),
            sample(A, 1.0, 6379),
            lifecycle(A, ContainerAction.KILL, 2.0, signal=signal.SIGHUP, stop_signal=signal.SIGTERM),
            counts(A, 2.5, 2.6, "read"),
            lifecycle(A, ContainerAction.KILL, 3.0, signal=signal.SIGKILL, stop_signal=signal.SIGTERM),
            counts(A, 3.5, 3.5, "exit_group"),
        ],
    )
    assert phases_of(out) == {Phase.RUNNING: {"read"}, Phase.SHUTDOWN: {"exit_group"}}
    assert changes(out)[-1] == (Phase.SHUTDOWN, "kill", 3.0)


def test_running_held_until_late_kill_arrives():
    # The records after the kill arrive before Docker's kill event. With time
    # advancing only to the latest event, they stay held until the kill comes.
    tracker = machine(lag=1.0)
    out = []
    for event in [
        lifecycle(A, ContainerAction.START, 0.0),
        sample(A, 1.0, 6379),
        counts(A, 4.0, 4.1, "epoll_wait"),
        counts(A, 5.2, 5.3, "unlink"),
    ]:
        out.extend(tracker.feed(event))
        out.extend(tracker.advance(tracker.latest))
    # epoll_wait started at 4.0 < 5.3 - lag, so it is released as running.
    assert phases_of(out) == {Phase.RUNNING: {"epoll_wait"}}
    out.extend(tracker.feed(lifecycle(A, ContainerAction.KILL, 5.0, signal=15, stop_signal=15)))
    out.extend(tracker.finish())
    assert phases_of(out) == {Phase.RUNNING: {"epoll_wait"}, Phase.SHUTDOWN: {"unlink"}}


def test_detector_timeout_keeps_booting():
    tracker = machine(timeout=10.0, lag=0.5)
    out = []
    for event in [
        lifecycle(A, ContainerAction.START, 0.0),
        counts(A, 1.0, 1.1, "openat"),
        sample(A, 5.0),
        counts(A, 10.0, 10.1, "read"),
        sample(A, 10.2),
    ]:
        out.extend(tracker.feed(event))
        out.extend(tracker.advance(event.wall_time if isinstance(event, ProcessSample) else T0))
    incomplete = [event for event in out if isinstance(event, TraceIncomplete)]
    assert [event.reason for event in incomplete] == []  # 10.2 - lag is before the 10 s limit
    out.extend(tracker.advance(T0 + 10.6))
    incomplete = [event for event in out if isinstance(event, TraceIncomplete)]
    assert [event.reason for event in incomplete] == ["detector_timeout"]
    assert "listen(port=6379)" in incomplete[0].detail
    out.extend(tracker.feed(sample(A, 12.0, 6379)))  # too late: ignored
    out.extend(tracker.feed(lifecycle(A, ContainerAction.KILL, 13.0, signal=15, stop_signal=15)))
    out.extend(tracker.feed(counts(A, 13.5, 13.6, "exit_group")))
    out.extend(tracker.finish())
    assert phases_of(out) == {Phase.BOOTING: {"openat", "read"}, Phase.SHUTDOWN: {"exit_group"}}
    assert [change[0] for change in changes(out)] == [Phase.BOOTING, Phase.SHUTDOWN]


def test_exit_while_booting_is_incomplete():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0),
            counts(A, 0.1, 0.2, "execve", "exit_group"),
            lifecycle(A, ContainerAction.DIE, 0.3, exit_code=3),
        ],
    )
    assert phases_of(out) == {Phase.BOOTING: {"execve", "exit_group"}}
    incomplete = [event for event in out if isinstance(event, TraceIncomplete)]
    assert [event.reason for event in incomplete] == ["exited_while_booting"]
    assert "code 3" in incomplete[0].detail


def test_containers_are_independent():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0),
            lifecycle(B, ContainerAction.START, 0.5),
            counts(A, 0.6, 0.7, "openat"),
            counts(B, 0.6, 0.7, "mmap"),
            sample(B, 1.0, 6379),
            counts(A, 1.5, 1.6, "read"),
            counts(B, 1.5, 1.6, "write"),
            sample(A, 2.0, 6379),
        ],
    )
    assert phases_of(out, A) == {Phase.BOOTING: {"openat", "read"}}
    assert phases_of(out, B) == {Phase.BOOTING: {"mmap"}, Phase.RUNNING: {"write"}}
    assert changes(out, A)[1] == (Phase.RUNNING, "listen", 2.0)
    assert changes(out, B)[1] == (Phase.RUNNING, "listen", 1.0)


def test_any_combinator_in_tracker():
    tracker = machine({"any": [{"type": "listen", "port": 80}, {"type": "delay", "after": "3s"}]}, lag=0.0)
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0),
            counts(A, 1.0, 1.1, "openat"),
            counts(A, 3.5, 3.6, "read"),
        ],
        advance_to=4.0,
    )
    assert changes(out)[1] == (Phase.RUNNING, "delay", 3.0)
    assert phases_of(out) == {Phase.BOOTING: {"openat"}, Phase.RUNNING: {"read"}}


# --- Spans and stop signals ----------------------------------------------------


def spanned(container: str, **spans: tuple[float, float]) -> SyscallCounts:
    """Counts of one call per name, with each name's first and last call time relative to T0."""
    keys = {name: SyscallKey(0, "x86_64", index, name) for index, name in enumerate(spans)}
    return SyscallCounts(
        container_id=container,
        start_time=T0 + min(first for first, _ in spans.values()),
        end_time=T0 + max(last for _, last in spans.values()),
        counts={key: 3 for key in keys.values()},
        spans={keys[name]: (T0 + first, T0 + last) for name, (first, last) in spans.items()},
    )


def kernel_signal(container: str, at: float, signal_number: int = signal.SIGTERM, **fields: object) -> SignalRecord:
    values = {"pid": 10, "sender_comm": "runc", "syscall": "kill", **fields}
    return SignalRecord(container_id=container, signal=signal_number, record_time=T0 + at, **values)


def test_spans_put_key_into_every_phase_it_reaches():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0, pid=10, stop_signal=15),
            spanned(A, read=(1.5, 2.5), openat=(1.0, 1.1)),  # read straddles readiness at 2.0
            sample(A, 2.0, 6379),
            spanned(A, epoll_wait=(4.0, 5.5), accept4=(4.0, 4.5), unlink=(5.2, 5.2)),  # epoll_wait straddles the stop
            kernel_signal(A, 5.0),
            spanned(A, futex=(1.9, 5.1)),  # booting to shutdown: running lies between
        ],
    )
    assert phases_of(out) == {
        Phase.BOOTING: {"read", "openat", "futex"},
        Phase.RUNNING: {"read", "epoll_wait", "accept4", "futex"},
        Phase.SHUTDOWN: {"epoll_wait", "unlink", "futex"},
    }
    # The first phase gets the calls but one per later phase.
    counts = {
        event.phase: count
        for event in out
        if isinstance(event, SyscallCounts)
        for key, count in event.counts.items()
        if key.name == "futex"
    }
    assert counts == {Phase.BOOTING: 1, Phase.RUNNING: 1, Phase.SHUTDOWN: 1}


def test_kernel_signal_before_docker_kill_wins():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0, pid=10),
            sample(A, 1.0, 6379),
            lifecycle(A, ContainerAction.KILL, 5.01, pid=10, signal=signal.SIGTERM, stop_signal=signal.SIGTERM),
            kernel_signal(A, 5.0),
            spanned(A, rt_sigreturn=(5.004, 5.004), epoll_wait=(4.9, 4.996)),
        ],
    )
    assert changes(out)[-1] == (Phase.SHUTDOWN, "signal", 5.0)
    assert phases_of(out) == {Phase.RUNNING: {"epoll_wait"}, Phase.SHUTDOWN: {"rt_sigreturn"}}


def test_call_in_signal_tick_goes_to_both_phases():
    # Kernel times have jiffy resolution: a call with the signal's own time may precede it.
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0, pid=10),
            sample(A, 1.0, 6379),
            kernel_signal(A, 5.0),
            spanned(A, sendmsg=(5.0, 5.0), wait4=(5.004, 5.004)),
        ],
    )
    assert phases_of(out) == {Phase.RUNNING: {"sendmsg"}, Phase.SHUTDOWN: {"sendmsg", "wait4"}}


def test_docker_stop_waits_for_kernel_record():
    # Docker's kill event comes first. The calls just before it are held for
    # lag, so the kernel's earlier time can still move them into shutdown.
    tracker = machine(lag=1.0)
    out = []
    for event in [
        lifecycle(A, ContainerAction.START, 0.0, pid=10),
        sample(A, 1.0, 6379),
        spanned(A, epoll_wait=(3.0, 3.1)),
        lifecycle(A, ContainerAction.KILL, 5.01, pid=10, signal=signal.SIGTERM, stop_signal=signal.SIGTERM),
        spanned(A, exit_group=(5.004, 5.004)),
    ]:
        out.extend(tracker.feed(event))
        out.extend(tracker.advance(tracker.latest))
    # Released: epoll_wait (older than lag); held: exit_group, before Docker's time.
    assert phases_of(out) == {Phase.RUNNING: {"epoll_wait"}}
    assert [change[0] for change in changes(out)] == [Phase.BOOTING, Phase.RUNNING]
    out.extend(tracker.feed(kernel_signal(A, 5.0)))
    out.extend(tracker.advance(tracker.latest))
    assert phases_of(out) == {Phase.RUNNING: {"epoll_wait"}, Phase.SHUTDOWN: {"exit_group"}}
    assert changes(out)[-1] == (Phase.SHUTDOWN, "signal", 5.0)


def test_docker_stop_final_after_lag():
    # Without a kernel record (no audit rule), Docker's time is the boundary once lag has passed.
    tracker = machine(lag=1.0)
    out = []
    for event in [
        lifecycle(A, ContainerAction.START, 0.0, pid=10),
        sample(A, 1.0, 6379),
        spanned(A, read=(4.9, 4.95), exit_group=(5.02, 5.02)),
        lifecycle(A, ContainerAction.KILL, 5.01, pid=10, signal=signal.SIGTERM, stop_signal=signal.SIGTERM),
    ]:
        out.extend(tracker.feed(event))
        out.extend(tracker.advance(tracker.latest))
    assert [change[0] for change in changes(out)] == [Phase.BOOTING, Phase.RUNNING]
    out.extend(tracker.advance(T0 + 6.02))
    assert changes(out)[-1] == (Phase.SHUTDOWN, "kill", 5.01)
    assert phases_of(out) == {Phase.RUNNING: {"read"}, Phase.SHUTDOWN: {"exit_group"}}


def test_signals_that_do_not_stop_ignored():
    tracker = machine()
    out = run_timeline(
        tracker,
        [
            lifecycle(A, ContainerAction.START, 0.0, pid=10, stop_signal=signal.SIGQUIT),
            sample(A, 1.0, 6379),
            kernel_signal(A, 2.0, signal.SIGTERM),  # not nginx's stop signal here
            kernel_signal(A, 3.0, signal.SIGQUIT, from_container=True),  # from a process of the container
            kernel_signal(A, 3.5, signal.SIGQUIT, pid=11),  # to a process other than init
            spanned(A, read=(3.6, 3.7)),
            kernel_signal(A, 4.0, signal.SIGQUIT),
            spanned(A, exit_group=(4.1, 4.1)),
        ],
    )
    assert changes(out)[-1] == (Phase.SHUTDOWN, "signal", 4.0)
    assert phases_of(out) == {Phase.RUNNING: {"read"}, Phase.SHUTDOWN: {"exit_group"}}


def test_kernel_record_after_announced_stop_keeps_boundary():
    tracker = machine(lag=0.5)
    out = []
    for event in [
        lifecycle(A, ContainerAction.START, 0.0, pid=10),
        sample(A, 1.0, 6379),
        lifecycle(A, ContainerAction.KILL, 5.01, pid=10, signal=signal.SIGTERM, stop_signal=signal.SIGTERM),
        spanned(A, write=(5.005, 5.005)),
    ]:
        out.extend(tracker.feed(event))
        out.extend(tracker.advance(tracker.latest))
    out.extend(tracker.advance(T0 + 6.0))
    out.extend(tracker.feed(kernel_signal(A, 5.0)))
    out.extend(tracker.finish())
    assert changes(out)[-1] == (Phase.SHUTDOWN, "kill", 5.01)
    assert phases_of(out) == {Phase.RUNNING: {"write"}}
