"""Parsing of bpftrace's JSON output, on output captured from real runs (see tests/data/ebpf/README.md)."""

from __future__ import annotations

from collections import Counter

import pytest

from speaker.bpf import output as bpf
from tests.conftest import DATA

ABI_CONTAINER_CGROUP = 14275


def parse_file(name: str) -> list[bpf.Output]:
    parsed = [bpf.parse_line(line) for line in (DATA / "ebpf" / name).read_bytes().splitlines()]
    return [item for item in parsed if item is not None]


def test_split_call_decodes_abi_flags() -> None:
    assert bpf.split_call(110) == ("x86_64", 110)
    assert bpf.split_call((1 << 32) | 20) == ("x86", 20)
    assert bpf.split_call(0x40000000 | 39) == ("x32", 0x40000027)
    assert bpf.split_call(0xFFFFFFFF) == ("x86_64", -1)


def test_abi_capture_counts_each_abi() -> None:
    parsed = parse_file("bpftrace-abi.jsonl")
    counts: Counter[tuple[str, int]] = Counter()
    for item in parsed:
        if isinstance(item, bpf.CountsPrinted):
            for entry in item.counts:
                if entry.cgroup_id == ABI_CONTAINER_CGROUP:
                    counts[(entry.arch, entry.nr)] += entry.count
    # syscall_loop abi 3 made 3 calls of each; runc's init made 2 more getppid.
    assert counts[("x86", 20)] == 3
    assert counts[("x32", 0x40000027)] == 3
    assert counts[("x86_64", 110)] == 5


def test_abi_capture_kinds() -> None:
    parsed = parse_file("bpftrace-abi.jsonl")
    assert isinstance(parsed[0], bpf.Attached)
    assert parsed[0].probes == 4
    cgroups = [item for item in parsed if isinstance(item, bpf.CgroupSeen) and item.cgroup_id == ABI_CONTAINER_CGROUP]
    # One line when the container's cgroup was made, one when it was removed.
    assert len(cgroups) == 2
    assert cgroups[0].path == "/docker/3a025b1f23752996e232498cfdbdd13810c1448ec44e5c79fd7786d456c80393"
    flushes = [item for item in parsed if isinstance(item, bpf.FlushStarted)]
    assert [item.period for item in flushes] == list(range(9345, 9352))
    assert flushes[0].kernel_ns == 4672551956286
    clears = [item for item in parsed if isinstance(item, bpf.ClearDone)]
    assert len(clears) == len(flushes)
    assert clears[0].boot_time == 4672.55
    # At exit bpftrace prints every map that is not empty, here only the flush marker.
    assert isinstance(parsed[-1], bpf.OtherOutput)
    assert '"@flushed": 9351' in parsed[-1].text


def test_printed_map_is_previous_period() -> None:
    parsed = parse_file("bpftrace-abi.jsonl")
    names = []
    for previous, item in zip(parsed, parsed[1:]):
        if isinstance(previous, bpf.FlushStarted) and isinstance(item, bpf.CountsPrinted):
            names.append((previous.period, item.map_name))
    assert len(names) == 7
    # The flush in period p prints the map of period p - 1, @counts<(p - 1) mod 3>.
    assert all(name == f"@counts{(period - 1) % 3}" for period, name in names)


def test_map_full_capture_reports_failures_and_lost_events() -> None:
    parsed = parse_file("bpftrace-map-full.jsonl")
    failed = [item for item in parsed if isinstance(item, bpf.HelperFailed)]
    lost = sum(item.count for item in parsed if isinstance(item, bpf.EventsLost))
    assert len(failed) == 4
    assert failed[0] == bpf.HelperFailed(helper="map_update_elem", retcode=-7)
    assert lost == 14585
    printed = [item for item in parsed if isinstance(item, bpf.CountsPrinted)]
    assert max(len(item.counts) for item in printed) == 64


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b'{"data": 1}',
        b'{"type": "map", "data": {"@counts0": {"1,2": 3}}}',
        b'{"type": "map", "data": {"@counts0": [1, 2]}}',
        b'{"type": "lost_events", "data": {}}',
        b'{"type": "printf", "data": "cgroup x /docker"}',
        b'{"type": "printf", "data": "signal 15 18672 0 16418472305142\\n"}',
        b'{"type": "printf", "data": "signal 15 pid 0 16418472305142 18650 bash\\n"}',
    ],
)
def test_invalid_line_raises_output_error(line: bytes) -> None:
    with pytest.raises(bpf.OutputError) as raised:
        bpf.parse_line(line)
    assert "bpftrace" in str(raised.value)


def test_blank_line_is_skipped() -> None:
    assert bpf.parse_line(b"\n") is None
    assert bpf.parse_line("") is None


def test_unknown_printf_is_other_output() -> None:
    parsed = bpf.parse_line('{"type": "printf", "data": "hello\\n"}')
    assert parsed == bpf.OtherOutput(kind="printf", text="hello\n")


def test_signal_line_parsed() -> None:
    # Printed by the program for `kill -TERM` from bash on the development VM.
    parsed = bpf.parse_line('{"type": "printf", "data": "signal 15 18672 0 16418472305142 18650 bash\\n"}')
    assert parsed == bpf.SignalSent(
        signal=15, pid=18672, code=0, kernel_ns=16418472305142, sender_pid=18650, sender_comm="bash"
    )


def test_signal_sender_comm_keeps_spaces() -> None:
    parsed = bpf.parse_line('{"type": "printf", "data": "signal 9 200 -6 1000 100 my worker\\n"}')
    assert isinstance(parsed, bpf.SignalSent)
    assert parsed.sender_comm == "my worker"
    assert parsed.code == -6
