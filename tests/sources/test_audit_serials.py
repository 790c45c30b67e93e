"""SerialTracker: holes, late records, duplicates and the grace period."""

from __future__ import annotations

import pytest

from speaker.audit.serials import SerialTracker


def test_consecutive_serials_lose_nothing():
    tracker = SerialTracker(grace=1.0)
    tracker.add(range(100, 200), now=0.0)
    assert tracker.top == 199
    assert tracker.confirm(now=10.0, final=True) == {}


def test_hole_confirmed_after_grace():
    tracker = SerialTracker(grace=2.0)
    tracker.add([1, 2, 5, 6], now=0.0)
    assert tracker.open_holes == 2
    assert tracker.confirm(now=1.9) == {}
    assert tracker.confirm(now=2.0) == {"serial_gap": 2}
    assert tracker.open_holes == 0


def test_late_record_fills_hole():
    tracker = SerialTracker(grace=2.0)
    tracker.add([10, 12, 11, 13], now=0.0)
    assert tracker.open_holes == 0
    tracker.add([15, 17, 16, 14], now=0.5)
    assert tracker.confirm(now=5.0, final=True) == {}


def test_late_record_splits_hole():
    tracker = SerialTracker(grace=2.0)
    tracker.add([1, 10], now=0.0)
    tracker.add([5], now=0.1)
    assert tracker.open_holes == 7
    assert tracker.confirm(now=3.0) == {"serial_gap": 7}


def test_duplicates_and_old_serials_ignored():
    # The records of one event share a serial; serials below the first one
    # belong to events that began before the trace.
    tracker = SerialTracker()
    tracker.add([50, 50, 50, 51, 49, 30, 52, 52], now=0.0)
    assert tracker.top == 52
    assert tracker.confirm(now=9.0, final=True) == {}


def test_final_confirms_young_holes():
    tracker = SerialTracker(grace=60.0)
    tracker.add([1, 4], now=0.0)
    assert tracker.confirm(now=1.0) == {}
    assert tracker.confirm(now=1.0, final=True) == {"serial_gap": 2}


def test_expected_gap_gets_its_reason_at_once():
    tracker = SerialTracker(grace=60.0)
    tracker.add([1, 2], now=0.0)
    tracker.expect_gap("rotated_away")
    tracker.add([10, 11, 20], now=0.0)
    assert tracker.confirm(now=0.0) == {"rotated_away": 7}
    assert tracker.confirm(now=0.0, final=True) == {"serial_gap": 8}


def test_expected_gap_that_does_not_come_is_forgotten():
    tracker = SerialTracker(grace=60.0)
    tracker.add([1, 2], now=0.0)
    tracker.expect_gap("rotated_away")
    tracker.add([3, 4, 9], now=0.0)
    assert tracker.confirm(now=0.0, final=True) == {"serial_gap": 4}


def test_run_extends_top_only_when_continuous():
    tracker = SerialTracker()
    tracker.add([7], now=0.0)
    assert tracker.extends(8)
    tracker.add_run(8, 100)
    assert tracker.top == 100
    with pytest.raises(ValueError, match="does not continue"):
        tracker.add_run(102, 110)
