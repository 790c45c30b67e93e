"""From per-cgroup slot counts to SyscallCounts per container and slot, on a made-up cgroup tree."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from speaker.bpf import attribution
from speaker.bpf.attribution import CountAttribution
from speaker.bpf.cgroups import CgroupNames, Hierarchy
from speaker.bpf.output import CgroupSeen, SlotCount
from speaker.events import SyscallKey

ID = "d954436a97ec8d11207a2890efbfe1e9f03fb496d53732b6afc2607a35e0e6c4"
LATE_ID = "c5702dad090782d8f94996ac16fca056a09babb14276829553db492215f5de61"
SLOT_NS = 10_000_000


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Any]:
    """Make a container cgroup and a service cgroup. Return their ids (inode numbers) and the tree's root."""
    container = tmp_path / "docker" / ID
    service = tmp_path / "system.slice" / "cron.service"
    container.mkdir(parents=True)
    service.mkdir(parents=True)
    return {"container": os.stat(container).st_ino, "service": os.stat(service).st_ino, "root": tmp_path}


def make(tree: dict[str, Any]) -> CountAttribution:
    names = CgroupNames(Hierarchy(version=2, mount=tree["root"], hierarchy_id=0))
    names.scan()
    return CountAttribution(names, SLOT_NS, "ebpf", structlog.get_logger("test"))


def test_events_one_per_container_and_slot(tree) -> None:
    counting = make(tree)
    cgroup = tree["container"]
    events = counting.events(
        [
            SlotCount(cgroup, "x86_64", 0, 101, 5),
            SlotCount(cgroup, "x86_64", 1, 100, 2),
            SlotCount(cgroup, "x86", 20, 100, 3),
            SlotCount(tree["service"], "x86_64", 0, 100, 7),
        ]
    )
    assert [event.container_id for event in events] == [ID, ID]
    first, second = events
    assert first.counts == {SyscallKey(0, "x86_64", 1): 2, SyscallKey(0, "x86", 20): 3}
    assert second.counts == {SyscallKey(0, "x86_64", 0): 5}
    # Slot 100 of 10 ms is [1.00 s, 1.01 s) of CLOCK_MONOTONIC, shifted to wall-clock time.
    offset = time.time() - time.monotonic()
    assert first.start_time == pytest.approx(1.00 + offset, abs=0.01)
    assert first.end_time - first.start_time == pytest.approx(0.01)
    assert second.start_time - first.start_time == pytest.approx(0.01)
    assert counting.stats["counted"] == 10
    assert counting.stats["host"] == 7
    assert counting.containers == {ID}


def test_unknown_cgroup_waits_for_its_path(tree) -> None:
    counting = make(tree)
    unknown = 987654321
    assert counting.events([SlotCount(unknown, "x86_64", 0, 100, 4)]) == []
    assert counting.holding
    assert counting.release(final=False) == []

    counting.add_cgroup(CgroupSeen(unknown, f"/system.slice/docker-{LATE_ID}.scope"))
    (event,) = counting.release(final=False)
    assert event.container_id == LATE_ID
    assert event.counts == {SyscallKey(0, "x86_64", 0): 4}
    assert not counting.holding


def test_unknown_cgroup_dropped_after_hold(tree, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = make(tree)
    counting.events([SlotCount(987654321, "x86_64", 0, 100, 4)])
    monkeypatch.setattr(attribution, "UNKNOWN_HOLD", 0.0)
    assert counting.release(final=False) == []
    assert counting.stats["unattributed"] == 4
    assert not counting.holding


def test_final_release_drops_unknown(tree) -> None:
    counting = make(tree)
    counting.events([SlotCount(987654321, "x86_64", 0, 100, 4)])
    assert counting.release(final=True) == []
    assert counting.stats["unattributed"] == 4


def test_cut_path_left_to_scan(tree) -> None:
    counting = make(tree)
    cut = "/" + "x" * 198
    counting.add_cgroup(CgroupSeen(123, cut))
    assert counting.names.path(123) is None
    counting.add_cgroup(CgroupSeen(124, cut[:-1]))
    assert counting.names.path(124) == cut[:-1]
