"""Events: immutability, timestamps and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from speaker.events import (
    CompiledFilter,
    ContainerAction,
    ContainerEvent,
    Phase,
    PhaseChange,
    ProcessSample,
    SyscallCounts,
    SyscallKey,
    SyscallRecord,
    TaskSample,
    Violation,
    event_from_dict,
)

SAMPLES = [
    ContainerEvent(container_id="abc", action=ContainerAction.KILL, name="web", pid=42, signal=15, labels={"a": "b"}),
    SyscallRecord(container_id="abc", pid=7, arch="x86", nr=5, name="open", serial=9, phase=Phase.BOOTING),
    SyscallCounts(container_id="abc", start_time=1.0, end_time=1.1, counts={SyscallKey(7, "x86_64", 0, "read"): 3}),
    ProcessSample(container_id="abc", tasks=(TaskSample(1, 1, "redis", "S", 232, 10),), listening_ports=(6379,)),
    PhaseChange(container_id="abc", phase=Phase.RUNNING, previous=Phase.BOOTING, reason="port 6379 listening"),
    CompiledFilter(
        phase=None,
        layout="notify",
        arches=("x86_64", "x86"),
        default_action="kill_process",
        allowed=frozenset({"read"}),
        notified=frozenset({"mount"}),
        bpf=b"\x06\x00\x00\x00\x00\x00\xff\x7f",
        phase_lists={Phase.BOOTING: frozenset({"mount", "read"})},
    ),
    Violation(container_id="abc", phase=Phase.RUNNING, pid=9, syscall="mount", arch="x86_64", action="denied"),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_event_json_round_trip(event) -> None:
    encoded = json.loads(json.dumps(event.to_dict()))
    assert event_from_dict(encoded) == event


def test_events_are_immutable() -> None:
    event = SAMPLES[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.pid = 1  # type: ignore[misc]


def test_events_carry_both_clocks() -> None:
    before_wall, before_mono = time.time(), time.monotonic()
    event = PhaseChange(container_id="x", phase=Phase.SHUTDOWN)
    assert before_wall <= event.wall_time <= time.time()
    assert before_mono <= event.mono_time <= time.monotonic()


def test_unknown_event_type_rejected() -> None:
    with pytest.raises(ValueError, match="unknown event type 'Nope'"):
        event_from_dict({"type": "Nope"})


def test_invalid_field_named() -> None:
    with pytest.raises(ValueError, match=r"PhaseChange.phase: invalid value 'later'"):
        event_from_dict({"type": "PhaseChange", "container_id": "x", "phase": "later"})
