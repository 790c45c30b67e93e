"""The chunk parser on audit streams captured on this machine (tests/data/audit/README.md)."""

from __future__ import annotations

import random

import pytest

from speaker.audit.chunks import ChunkParser
from speaker.audit.reader import append_lines
from speaker.audit.serials import SerialTracker
from tests.sources.audit_reference import (
    netlink_datagrams,
    pids_of,
    read_fixture,
    reference_counts,
    reference_serials,
    reference_spans,
)

GETPPID = 110
#: runc's init makes one getppid before it execs the program under the same
#: pid (checked with grep 'syscall=110 ' on the fixtures: comm="runc:[2:INIT]").
RUNC_GETPPID = 1


def parse_in_chunks(text: bytes, sizes: list[int] | None = None, keep_records: bool = False):
    """Parse ``text`` in chunks cut at newlines near ``sizes``; return the summed counts, results and tracker."""
    tracker = SerialTracker(grace=0.0)
    parser = ChunkParser(tracker, keep_records=keep_records)
    results = []
    start = 0
    sizes = sizes or [len(text)]
    index = 0
    while start < len(text):
        target = start + sizes[index % len(sizes)]
        index += 1
        end = text.find(b"\n", min(target, len(text) - 1)) + 1 or len(text)
        results.append(parser.parse(text[start:end]))
        start = end
    counts = sum((result.counts for result in results), start=type(results[0].counts)())
    return counts, results, tracker


def netlink_text(relative: str) -> bytes:
    pending = bytearray()
    for datagram in netlink_datagrams(relative):
        append_lines(pending, datagram, len(datagram))
    return bytes(pending)


def test_i386_records_named_x86():
    text = read_fixture("i386/audit.log")
    counts, _, tracker = parse_in_chunks(text)
    (pid,) = pids_of(text, b'"/i386"')
    # The program makes getpid (20), write (4) and exit (1) through int 0x80;
    # before it, runc's init made x86_64 syscalls under the same pid.
    assert {key: n for key, n in counts.items() if key[0] == pid and key[1] != "x86_64"} == {
        (pid, "x86", 20): 1,
        (pid, "x86", 4): 1,
        (pid, "x86", 1): 1,
    }
    assert tracker.confirm(final=True) == {}


def test_x32_bit_names_x32_and_keeps_number():
    text = read_fixture("i386/audit.log")
    counts, _, _ = parse_in_chunks(text)
    (pid,) = pids_of(text, b'"/storm"')
    assert counts[(pid, "x32", 0x40000000 | GETPPID)] == 1
    assert counts[(pid, "x86_64", GETPPID)] == 3 + RUNC_GETPPID


def test_counts_match_reference_parser():
    for fixture in ("i386/audit.log", "two/audit.log.gz", "rotation/audit.log.1.gz", "rotation/audit.log.gz"):
        text = read_fixture(fixture)
        counts, _, _ = parse_in_chunks(text)
        assert counts == reference_counts(text), fixture


def merged_spans(results) -> dict:
    """Return the span of each key over all chunks: its earliest first time and latest last time."""
    spans: dict = {}
    for result in results:
        for key, (first, last) in result.spans.items():
            known = spans.get(key, (first, last))
            spans[key] = (min(known[0], first), max(known[1], last))
    return spans


@pytest.mark.parametrize("fixture", ["i386/audit.log", "two/audit.log.gz", "rotation/audit.log.gz"])
@pytest.mark.parametrize("sizes", [None, [3000, 17000, 500]])
def test_spans_match_reference(fixture, sizes):
    text = read_fixture(fixture)
    counts, results, _ = parse_in_chunks(text, sizes)
    assert merged_spans(results) == reference_spans(text)
    assert set(merged_spans(results)) == set(counts)
    for result in results:
        if result.spans:
            assert result.start_time == min(first for first, _ in result.spans.values())
            assert result.end_time == max(last for _, last in result.spans.values())


def test_spans_same_on_every_path():
    text = read_fixture("two/audit.log.gz")
    _, fast, _ = parse_in_chunks(text, sizes=[30000])
    _, exact, _ = parse_in_chunks(text, sizes=[30000], keep_records=True)
    assert {result.path for result in fast} == {"fast", "bulk"}
    assert merged_spans(fast) == merged_spans(exact)


def test_marker_removed_with_its_span():
    text = read_fixture("two/audit.log.gz")
    _, (result,), _ = parse_in_chunks(text)
    (pid,) = pids_of(text, b'"/storm"') - {max(pids_of(text, b'"/storm"'))}
    key = (pid, "x86_64", GETPPID)
    count = result.counts[key]
    records = result.records
    assert result.remove(key) == count
    assert key not in result.spans
    assert result.records == records - count
    assert result.start_time == min(first for first, _ in result.spans.values())


def test_two_containers_counted_apart():
    text = read_fixture("two/audit.log.gz")
    counts, _, tracker = parse_in_chunks(text, sizes=[20000])
    getppid_per_pid = sorted(counts[(pid, "x86_64", GETPPID)] for pid in pids_of(text, b'"/storm"'))
    assert getppid_per_pid == [1000 + RUNC_GETPPID, 2000 + RUNC_GETPPID]
    assert tracker.confirm(final=True) == {}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunk_size_changes_nothing(seed):
    text = read_fixture("two/audit.log.gz")
    whole, _, _ = parse_in_chunks(text)
    sizes = [random.Random(seed).randint(200, 60000) for _ in range(50)]
    pieces, results, tracker = parse_in_chunks(text, sizes)
    assert pieces == whole
    assert tracker.confirm(final=True) == {}
    paths = {result.path for result in results}
    assert "fast" in paths


def test_exact_path_counts_like_fast_path():
    text = read_fixture("two/audit.log.gz")
    fast, _, _ = parse_in_chunks(text, sizes=[30000])
    exact, results, _ = parse_in_chunks(text, sizes=[30000], keep_records=True)
    assert exact == fast
    assert {result.path for result in results} == {"exact"}


def test_exact_path_keeps_record_fields():
    text = read_fixture("i386/audit.log")
    _, results, _ = parse_in_chunks(text, keep_records=True)
    (pid,) = pids_of(text, b'"/i386"')
    records = [record for result in results for record in result.seccomp if record.pid == pid and record.arch == "x86"]
    assert [(record.arch, record.nr) for record in records] == [("x86", 20), ("x86", 4), ("x86", 1)]
    assert {record.comm for record in records} == {"i386"}
    assert {record.exe for record in records} == {"/i386"}
    assert {record.action for record in records} == {0x7FFC0000}
    assert all(record.serial > 0 and record.time > 1.7e9 for record in records)


def test_netlink_capture_matches_audit_log():
    # The same run was captured from the multicast socket and by auditd.
    for directory in ("i386", "two"):
        suffix = ".gz" if directory == "two" else ""
        from_log = reference_counts(read_fixture(f"{directory}/audit.log{suffix}"))
        from_netlink, _, tracker = parse_in_chunks(netlink_text(f"{directory}/netlink.bin{suffix}"), sizes=[50000])
        storms = pids_of(read_fixture(f"{directory}/audit.log{suffix}"), b'"/storm"')
        for pid in storms:
            ours = {key: n for key, n in from_netlink.items() if key[0] == pid}
            theirs = {key: n for key, n in from_log.items() if key[0] == pid}
            assert ours == theirs
        assert tracker.confirm(final=True) == {}


def test_netlink_lines_carry_type_numbers():
    text = netlink_text("i386/netlink.bin")
    assert text.count(b"type=SECCOMP msg=audit(") == 355
    first_other = next(line for line in text.split(b"\n") if not line.startswith(b"type=SECCOMP"))
    assert first_other.split(b" ", 1)[0].removeprefix(b"type=").isdigit()


def test_garbled_lines_counted():
    text = read_fixture("garbled/audit.log")
    complete = text[: text.rfind(b"\n") + 1]
    counts, results, tracker = parse_in_chunks(complete)
    # src/damage.py: 6 damaged or inserted lines, 5 records gone (lines 5,
    # 10, 15, 20 and 21 of the 355), and line 21's serial lost.
    assert sum(result.garbled for result in results) == 6
    assert sum(counts.values()) == 355 - 5
    assert tracker.confirm(final=True) == {"serial_gap": 1}
    assert counts == reference_counts(complete)


def test_missing_line_is_one_serial_gap():
    text = read_fixture("two/audit.log.gz")
    lines = text.split(b"\n")
    seccomp = [index for index, line in enumerate(lines) if line.startswith(b"type=SECCOMP")]
    del lines[seccomp[len(seccomp) // 2]]
    _, _, tracker = parse_in_chunks(b"\n".join(lines), sizes=[40000])
    assert tracker.confirm(final=True) == {"serial_gap": 1}


def test_rotation_pair_has_continuous_serials():
    old = read_fixture("rotation/audit.log.1.gz")
    new = read_fixture("rotation/audit.log.gz")
    serials = reference_serials(old) + reference_serials(new)
    assert sorted(set(serials)) == list(range(min(serials), max(serials) + 1))
    counts, _, tracker = parse_in_chunks(old + new, sizes=[8000])
    (pid,) = pids_of(old + new, b'"/storm"')
    assert counts[(pid, "x86_64", GETPPID)] == 400 + RUNC_GETPPID
    assert tracker.confirm(final=True) == {}


def test_chunk_must_end_with_newline():
    parser = ChunkParser(SerialTracker())
    with pytest.raises(ValueError, match="newline"):
        parser.parse(b"type=SECCOMP msg=audit(1.000:1): pid=1")


def insert_lines(text: bytes, inserts: dict[int, bytes]) -> bytes:
    """Return ``text`` with a line inserted before each given line index (counted in the original text)."""
    lines = text.split(b"\n")[:-1]
    for index in sorted(inserts, reverse=True):
        lines.insert(index, inserts[index])
    return b"".join(line + b"\n" for line in lines)


#: Lines that are not audit records: random bytes, a block of NULs, an empty
#: line, text without a header, and a header whose serial is not a number.
JUNK_LINES = [
    random.Random(7).randbytes(3000).replace(b"\n", b"."),
    b"\0" * 65536,
    b"",
    b"A" * 5000,
    b"type=SECCOMP msg=audit(1796416970.577:x): pid=1",
]


@pytest.mark.parametrize("sizes", [[30000], [3000, 17000, 500]])
def test_garbled_same_on_every_path(sizes):
    clean = read_fixture("two/audit.log.gz")
    line_count = clean.count(b"\n")
    # Spread over the file, inside runs of SECCOMP lines that the fast path would take.
    positions = [line_count * (index + 1) // (len(JUNK_LINES) + 1) for index in range(len(JUNK_LINES))]
    text = insert_lines(clean, dict(zip(positions, JUNK_LINES)))

    counts, results, tracker = parse_in_chunks(text, sizes)
    exact_counts, exact_results, exact_tracker = parse_in_chunks(text, sizes, keep_records=True)
    clean_counts, clean_results, _ = parse_in_chunks(clean, sizes)

    assert sum(result.garbled for result in results) == len(JUNK_LINES)
    assert sum(result.garbled for result in exact_results) == len(JUNK_LINES)
    assert counts == exact_counts == reference_counts(clean)
    assert tracker.confirm(final=True) == exact_tracker.confirm(final=True) == {}
    assert "fast" in {result.path for result in clean_results}
    assert {result.path for result in exact_results} == {"exact"}


def test_random_bytes_all_garbled():
    text = random.Random(11).randbytes(1 << 20)
    text = text[: text.rfind(b"\n") + 1]
    lines = text.split(b"\n")[:-1]
    # An independent check that no line happens to start like a record.
    assert not any(line.startswith(b"type=") for line in lines)

    counts, results, tracker = parse_in_chunks(text, [65536])
    exact_counts, exact_results, _ = parse_in_chunks(text, [65536], keep_records=True)

    assert sum(result.garbled for result in results) == len(lines)
    assert sum(result.garbled for result in exact_results) == len(lines)
    assert counts == exact_counts == {}
    assert tracker.confirm(final=True) == {}


def test_glued_records_same_on_every_path():
    # The damaged fixture glues a cut record to half of the next one.
    text = read_fixture("garbled/audit.log")
    complete = text[: text.rfind(b"\n") + 1]
    for sizes in (None, [2000], [700]):
        counts, results, tracker = parse_in_chunks(complete, sizes)
        exact_counts, exact_results, exact_tracker = parse_in_chunks(complete, sizes, keep_records=True)
        assert sum(result.garbled for result in results) == 6
        assert sum(result.garbled for result in exact_results) == 6
        assert counts == exact_counts
        assert tracker.confirm(final=True) == exact_tracker.confirm(final=True) == {"serial_gap": 1}


def replace_field(line: bytes, name: bytes, value: bytes) -> bytes:
    """Return a SECCOMP line with the value of the field ``name`` (such as b"arch") replaced."""
    start = line.index(b" " + name + b"=") + len(name) + 2
    return line[:start] + value + line[line.index(b" ", start) :]


#: Values that parse but no profile can contain, and values that do not parse.
OUT_OF_RANGE_FIELDS = [
    (b"arch", b"c00000b7"),  # aarch64
    (b"syscall", b"99999999999999999999999"),
    (b"syscall", b"4000"),
    (b"syscall", b"-1"),
    (b"pid", b"100000000000000000000000"),
    (b"pid", b"4194304"),  # PID_MAX_LIMIT, one more than the largest pid
    (b"pid", b"0"),
]
GARBLED_FIELDS = [
    (b"pid", b"1e23"),
    (b"syscall", b"0x10"),
]


def damage_records(text: bytes, changes: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """Replace one field in SECCOMP records spread over ``text``; return the damaged text and the text without those records.

    Each change replaces a record in place, so the serials stay continuous and
    the fast path can take the chunk.
    """
    lines = text.split(b"\n")[:-1]
    seccomp = [index for index, line in enumerate(lines) if line.startswith(b"type=SECCOMP ")]
    targets = [seccomp[len(seccomp) * (index + 1) // (len(changes) + 1)] for index in range(len(changes))]
    for index, (name, value) in zip(targets, changes):
        lines[index] = replace_field(lines[index], name, value)
    damaged = b"".join(line + b"\n" for line in lines)
    untouched = b"".join(line + b"\n" for index, line in enumerate(lines) if index not in targets)
    return damaged, untouched


@pytest.mark.parametrize("sizes", [None, [20000]])
def test_out_of_range_keys_counted(sizes):
    damaged, untouched = damage_records(read_fixture("two/audit.log.gz"), OUT_OF_RANGE_FIELDS + GARBLED_FIELDS)

    counts, results, tracker = parse_in_chunks(damaged, sizes)
    exact_counts, exact_results, _ = parse_in_chunks(damaged, sizes, keep_records=True)

    for chunk_results in (results, exact_results):
        assert sum(result.out_of_range for result in chunk_results) == len(OUT_OF_RANGE_FIELDS)
        assert sum(result.garbled for result in chunk_results) == len(GARBLED_FIELDS)
    assert counts == exact_counts == reference_counts(untouched)
    assert sum(result.records for result in results) == sum(counts.values())
    assert tracker.confirm(final=True) == {}
    examples = [result.out_of_range_example for result in results if result.out_of_range]
    assert examples
    assert all(example.startswith(b"pid=") for example in examples)


def test_out_of_range_keys_on_fast_path():
    damaged, untouched = damage_records(read_fixture("two/audit.log.gz"), OUT_OF_RANGE_FIELDS)
    counts, results, _ = parse_in_chunks(damaged, [20000])
    fast = [result for result in results if result.path == "fast" and result.out_of_range]
    assert fast
    assert sum(result.out_of_range for result in results) == len(OUT_OF_RANGE_FIELDS)
    assert counts == reference_counts(untouched)
    for result in fast:
        assert result.records == sum(result.counts.values())
        assert set(result.spans) == set(result.counts)


def test_highest_numbers_in_range():
    line = next(line for line in read_fixture("i386/audit.log").split(b"\n") if line.startswith(b"type=SECCOMP "))
    pid = int(line.split(b" pid=")[1].split(b" ")[0])
    highest_pid = replace_field(replace_field(line, b"pid", b"4194303"), b"syscall", b"1023")
    highest_x32 = replace_field(line, b"syscall", str(0x40000000 | 1023).encode())
    counts, results, _ = parse_in_chunks(highest_pid + b"\n" + highest_x32 + b"\n", keep_records=True)
    assert set(counts) == {(4194303, "x86_64", 1023), (pid, "x32", 0x40000000 | 1023)}
    assert sum(result.out_of_range for result in results) == 0


def test_damaged_time_counted_garbled():
    text = read_fixture("two/audit.log.gz")
    lines = text.split(b"\n")[:-1]
    seccomp = [index for index, line in enumerate(lines) if line.startswith(b"type=SECCOMP ")]
    target = seccomp[len(seccomp) // 2]
    # A key of its own, so that this line is its key's first and last record,
    # whose time the fast path reads.
    line = replace_field(lines[target], b"pid", b"4000000")
    stamp = line.index(b"audit(") + len(b"audit(")
    lines[target] = line[:stamp] + b"x" + line[stamp + 1 :]
    damaged = b"".join(line + b"\n" for line in lines)

    for keep_records in (False, True):
        counts, results, tracker = parse_in_chunks(damaged, [20000], keep_records=keep_records)
        assert sum(result.garbled for result in results) == 1
        assert all(key[0] != 4000000 for key in counts)
        assert tracker.confirm(final=True) == {"serial_gap": 1}
