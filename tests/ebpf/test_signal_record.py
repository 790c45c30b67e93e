"""SignalRecords made from the program's signal lines, and the spans of the counts in a signal's slot."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import structlog

from speaker.bpf.attribution import CountAttribution
from speaker.bpf.cgroups import CgroupNames, Hierarchy
from speaker.bpf.output import SignalSent, SlotCount
from speaker.bpf.signals import SLOT_RETENTION, SignalSlots, signal_record
from speaker.container_cgroups import CgroupResolver
from speaker.events import Phase, SyscallKey
from speaker.phase_boundaries import Boundaries, place


def sent(code: int, kernel_ns: int = 0) -> SignalSent:
    return SignalSent(signal=15, pid=300, code=code, kernel_ns=kernel_ns, sender_pid=200, sender_comm="runc")


def test_record_time_is_wall_clock() -> None:
    before = time.time()
    record = signal_record(sent(0, time.monotonic_ns()), "ebpf")
    after = time.time()
    assert before - 0.001 <= record.record_time <= after + 0.001


def test_record_fields_from_line() -> None:
    record = signal_record(sent(0), "recorder", "abc")
    assert (record.pid, record.signal, record.sender_pid, record.sender_comm) == (300, 15, 200, "runc")
    assert record.source == "recorder"
    assert record.container_id == "abc"
    assert not record.from_container


@pytest.mark.parametrize(
    ("code", "syscall"),
    [
        (0, "kill or pidfd_send_signal"),
        (-1, "rt_sigqueueinfo or pidfd_send_signal"),
        (-6, "tkill or tgkill"),
        (-4, "si_code -4"),
    ],
)
def test_syscall_named_by_si_code(code: int, syscall: str) -> None:
    assert signal_record(sent(code), "ebpf").syscall == syscall


SLOT_NS = 10_000_000
CONTAINER = "d954436a97ec8d11207a2890efbfe1e9f03fb496d53732b6afc2607a35e0e6c4"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A /proc with pid 300 in the container's cgroup and pid 400 on the host."""
    for pid, path in ((300, f"/docker/{CONTAINER}"), (400, "/system.slice/cron.service")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(f"0::{path}\n")
    return tmp_path


def attribution_with(slots: SignalSlots, tmp_path: Path) -> tuple[CountAttribution, int]:
    """Return a CountAttribution over a cgroup tree with the container's cgroup, and that cgroup's id."""
    cgroup = tmp_path / "cgroup" / "docker" / CONTAINER
    cgroup.mkdir(parents=True)
    names = CgroupNames(Hierarchy(version=2, mount=tmp_path / "cgroup", hierarchy_id=0))
    names.scan()
    counting = CountAttribution(names, SLOT_NS, "ebpf", structlog.get_logger("test"), slots)
    return counting, os.stat(cgroup).st_ino


def test_receiver_container_read_from_proc(proc: Path) -> None:
    slots = SignalSlots(SLOT_NS, CgroupResolver(proc=str(proc)))
    assert slots.receiver_container(300) == CONTAINER
    assert slots.receiver_container(400) == ""
    assert slots.receiver_container(500) is None


def test_signal_slot_counts_get_slot_spans(tmp_path: Path) -> None:
    slots = SignalSlots(SLOT_NS)
    slots.add(sent(0, 100 * SLOT_NS + 3_000_000), CONTAINER)
    counting, cgroup = attribution_with(slots, tmp_path)
    events = counting.events([SlotCount(cgroup, "x86_64", 0, 100, 4), SlotCount(cgroup, "x86_64", 1, 101, 2)])

    signalled, later = events
    key = SyscallKey(0, "x86_64", 0)
    assert signalled.spans == {key: (signalled.start_time, signalled.end_time)}
    assert later.spans == {}


def test_host_receiver_marks_no_slot() -> None:
    slots = SignalSlots(SLOT_NS)
    slots.add(sent(0, 100 * SLOT_NS), "")
    assert not slots.marked(CONTAINER, 100)


def test_gone_receiver_marks_every_container() -> None:
    slots = SignalSlots(SLOT_NS)
    slots.add(sent(0, 100 * SLOT_NS), None)
    assert slots.marked(CONTAINER, 100)
    assert slots.marked("another", 100)
    assert not slots.marked(CONTAINER, 101)


def test_old_slots_forgotten() -> None:
    slots = SignalSlots(SLOT_NS)
    slots.add(sent(0, 100 * SLOT_NS), CONTAINER)
    slots.add(sent(0, 100 * SLOT_NS + round(SLOT_RETENTION * 1e9) + 2 * SLOT_NS), CONTAINER)
    assert not slots.marked(CONTAINER, 100)


def test_stop_inside_slot_reaches_shutdown(tmp_path: Path) -> None:
    # nginx makes its shutdown syscalls within milliseconds of SIGTERM, in
    # the slot of the signal: without spans they would all go to running.
    slots = SignalSlots(SLOT_NS)
    signal_ns = 100 * SLOT_NS + 3_000_000
    slots.add(sent(0, signal_ns), CONTAINER)
    counting, cgroup = attribution_with(slots, tmp_path)
    (event,) = counting.events([SlotCount(cgroup, "x86_64", 0, 100, 4)])
    stop = signal_record(sent(0, signal_ns), "ebpf").record_time
    boundaries = Boundaries(run=event.start_time - 10, stop=stop, stop_from_kernel=True)

    pieces = place(event, boundaries)
    assert [piece.phase for piece in pieces] == [Phase.RUNNING, Phase.SHUTDOWN]
    key = SyscallKey(0, "x86_64", 0)
    assert [piece.counts[key] for piece in pieces] == [3, 1]
