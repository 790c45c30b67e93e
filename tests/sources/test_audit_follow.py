"""AuditLogFollower across auditd-style rotations, on captured log content.

The tests rename and delete files the way auditd rotates (audit.log ->
audit.log.1 -> ..., the oldest deleted once num_logs files exist), while the
follower has a file open.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from pathlib import Path

import anyio
import pytest

from speaker.audit.chunks import ChunkParser
from speaker.audit.follow import (
    EXAMPLE_LENGTH,
    MAX_LINE_LENGTH,
    AuditLogFollower,
    Chunk,
    LongLine,
    NotRegularFileError,
    Switch,
)
from speaker.audit.serials import SerialTracker
from tests.sources.audit_reference import read_fixture, reference_counts, reference_serials


class Reader:
    """A follower with a parser, as the audit_log source drives them."""

    def __init__(self, path: Path, *, from_start: bool = True, read_size: int = 4096) -> None:
        self.follower = AuditLogFollower(path, from_start=from_start, read_size=read_size)
        self.tracker = SerialTracker(grace=0.0)
        self.parser = ChunkParser(self.tracker)
        self.counts: collections.Counter[tuple[int, str, int]] = collections.Counter()
        self.switches: list[Switch] = []

    async def read_available(self, limit: int | None = None) -> None:
        """Read until nothing is new, or until ``limit`` chunks were read."""
        chunks = 0
        while limit is None or chunks < limit:
            item = await self.follower.read()
            if item is None:
                return
            if isinstance(item, Switch):
                self.switches.append(item)
                if item.rotated_away:
                    self.tracker.expect_gap("rotated_away")
                continue
            assert isinstance(item, Chunk)
            self.counts.update(self.parser.parse(item.buffer, item.end).counts)
            chunks += 1


def split_lines(text: bytes, parts: int) -> list[bytes]:
    lines = text.split(b"\n")[:-1]
    size = len(lines) // parts + 1
    return [b"".join(line + b"\n" for line in lines[index : index + size]) for index in range(0, len(lines), size)]


def test_rotation_followed_without_loss(tmp_path):
    old = read_fixture("rotation/audit.log.1.gz")
    new = read_fixture("rotation/audit.log.gz")
    log = tmp_path / "audit.log"

    async def scenario() -> Reader:
        cut = len(old) // 2 + 7  # inside a line
        log.write_bytes(old[:cut])
        reader = Reader(log)
        await reader.follower.open()
        await reader.read_available()
        with log.open("ab") as handle:
            handle.write(old[cut:])
        log.rename(tmp_path / "audit.log.1")
        log.write_bytes(new[:1000])
        await reader.read_available()
        with log.open("ab") as handle:
            handle.write(new[1000:])
        await reader.read_available()
        await reader.follower.close()
        return reader

    reader = anyio.run(scenario)
    assert reader.counts == reference_counts(old + new)
    assert [(switch.current.name, switch.rotated_away) for switch in reader.switches] == [("audit.log", False)]
    assert reader.tracker.confirm(final=True) == {}


def test_deleted_files_reported_rotated_away(tmp_path):
    first, second, third, fourth = split_lines(read_fixture("two/audit.log.gz"), 4)
    log = tmp_path / "audit.log"
    rotated = tmp_path / "audit.log.1"

    async def scenario() -> Reader:
        log.write_bytes(first)
        reader = Reader(log)
        await reader.follower.open()
        await reader.read_available(limit=2)
        # Three rotations with num_logs = 2 while the follower is behind: the
        # file it reads and the next one are deleted, the second one unread.
        log.rename(rotated)
        log.write_bytes(second)
        rotated.unlink()
        log.rename(rotated)
        log.write_bytes(third)
        rotated.unlink()
        log.rename(rotated)
        log.write_bytes(fourth)
        await reader.read_available()
        await reader.follower.close()
        return reader

    reader = anyio.run(scenario)
    assert reader.counts == reference_counts(first + third + fourth)
    assert [(switch.current.name, switch.rotated_away) for switch in reader.switches] == [
        ("audit.log.1", True),
        ("audit.log", False),
    ]
    assert reader.tracker.confirm(final=True) == {"rotated_away": len(set(reference_serials(second)))}


def test_partial_line_waits_for_newline(tmp_path):
    line = read_fixture("i386/audit.log").split(b"\n")[5] + b"\n"
    log = tmp_path / "audit.log"
    log.write_bytes(line[:50])

    async def scenario() -> tuple[object, bytes, Chunk]:
        follower = AuditLogFollower(log, from_start=True)
        await follower.open()
        first = await follower.read()
        waiting = follower.leftover()
        with log.open("ab") as handle:
            handle.write(line[50:])
        second = await follower.read()
        await follower.close()
        assert isinstance(second, Chunk)
        return first, waiting, second

    first, waiting, second = anyio.run(scenario)
    assert first is None
    assert waiting == line[:50]
    assert bytes(second.buffer[: second.end]) == line


def test_start_at_end_skips_old_lines(tmp_path):
    lines = read_fixture("i386/audit.log").split(b"\n")
    log = tmp_path / "audit.log"
    old = lines[0] + b"\n" + lines[1][:40]  # the last line is still being written

    async def scenario() -> Chunk:
        log.write_bytes(old)
        follower = AuditLogFollower(log)
        await follower.open()
        with log.open("ab") as handle:
            handle.write(lines[1][40:] + b"\n" + lines[2] + b"\n")
        chunk = await follower.read()
        await follower.close()
        assert isinstance(chunk, Chunk)
        return chunk

    chunk = anyio.run(scenario)
    assert bytes(chunk.buffer[: chunk.end]) == lines[2] + b"\n"


def test_line_longer_than_buffer(tmp_path):
    log = tmp_path / "audit.log"
    long_line = b"type=USER msg=audit(1796416971.869:5): " + b"x" * 10000 + b"\n"
    log.write_bytes(long_line)

    async def scenario() -> bytes:
        follower = AuditLogFollower(log, from_start=True, read_size=4096)
        await follower.open()
        chunk = await follower.read()
        await follower.close()
        assert isinstance(chunk, Chunk)
        return bytes(chunk.buffer[: chunk.end])

    assert anyio.run(scenario) == long_line


def read_everything(log: Path, read_size: int, appends: list[bytes] = ()) -> tuple[Reader, list[LongLine], LongLine | None, int]:
    """Read ``log`` to its end, and append the next of ``appends`` each time the end is reached.

    Returns the reader, the skipped long lines, the long line still being
    skipped at the end, and the largest buffer size seen.
    """
    long_lines: list[LongLine] = []
    largest = 0

    async def scenario() -> tuple[Reader, LongLine | None]:
        nonlocal largest
        reader = Reader(log, read_size=read_size)
        await reader.follower.open()
        pending = list(appends)
        while True:
            item = await reader.follower.read()
            largest = max(largest, len(reader.follower._buffer))
            if item is None:
                if not pending:
                    break
                with log.open("ab") as handle:
                    handle.write(pending.pop(0))
                continue
            assert isinstance(item, Chunk)
            long_lines.extend(item.long_lines)
            reader.counts.update(reader.parser.parse(item.buffer, item.end).counts)
        unfinished = reader.follower.take_long_line()
        await reader.follower.close()
        return reader, unfinished

    reader, unfinished = anyio.run(scenario)
    return reader, long_lines, unfinished, largest


@pytest.mark.parametrize("read_size", [4096, 1 << 20, 3 * MAX_LINE_LENGTH])
def test_long_line_skipped_with_size(tmp_path, read_size):
    first, second = split_lines(read_fixture("two/audit.log.gz"), 2)
    long_line = b"type=USER msg=audit(1796416971.869:5): " + b"A" * (MAX_LINE_LENGTH + 10) + b"\n"
    log = tmp_path / "audit.log"
    log.write_bytes(first + long_line + second)

    reader, long_lines, unfinished, largest = read_everything(log, read_size)

    assert [line.size for line in long_lines] == [len(long_line)]
    assert long_lines[0].example == long_line[:EXAMPLE_LENGTH]
    assert long_lines[0].path == log
    assert unfinished is None
    assert reader.counts == reference_counts(first + second)
    assert largest <= max(read_size, 2 * MAX_LINE_LENGTH)


def test_long_line_growing_while_read(tmp_path):
    lines = split_lines(read_fixture("i386/audit.log"), 1)[0]
    log = tmp_path / "audit.log"
    log.write_bytes(lines + b"B" * 1000)
    # The line grows past the limit over several reads, then ends.
    appends = [b"B" * (MAX_LINE_LENGTH // 2)] * 3 + [b"B\n" + lines]

    reader, long_lines, unfinished, largest = read_everything(log, 65536, appends)

    assert [line.size for line in long_lines] == [1000 + 3 * (MAX_LINE_LENGTH // 2) + 2]
    assert unfinished is None
    assert reader.counts == reference_counts(lines + lines)
    assert largest <= 2 * MAX_LINE_LENGTH


def test_long_line_without_newline_at_end(tmp_path):
    lines = split_lines(read_fixture("i386/audit.log"), 1)[0]
    log = tmp_path / "audit.log"
    log.write_bytes(lines + b"\0" * (3 * MAX_LINE_LENGTH + 5))

    reader, long_lines, unfinished, largest = read_everything(log, 1 << 20)

    assert long_lines == []
    assert unfinished is not None
    assert unfinished.size == 3 * MAX_LINE_LENGTH + 5
    assert reader.follower.leftover() == b""
    assert reader.counts == reference_counts(lines)
    assert largest <= 2 * MAX_LINE_LENGTH


def test_line_at_limit_kept(tmp_path):
    line = b"type=USER msg=audit(1796416971.869:5): "
    line += b"x" * (MAX_LINE_LENGTH - len(line)) + b"\n"
    log = tmp_path / "audit.log"
    log.write_bytes(line)

    _, long_lines, unfinished, _ = read_everything(log, 4096)

    assert long_lines == []
    assert unfinished is None


def open_within(path: Path, seconds: float) -> BaseException | None:
    """Open ``path`` with a follower on a thread; return the error it raised, or fail if it blocks."""
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            anyio.run(AuditLogFollower(path, from_start=True).open)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"opening {path} blocked"
    return errors[0] if errors else None


def test_non_regular_files_rejected(tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "socket.log"))
    try:
        for path in (fifo, tmp_path / "socket.log", Path("/dev/zero"), tmp_path):
            error = open_within(path, 5.0)
            assert isinstance(error, NotRegularFileError), path
            assert str(error) == f"{path}: not a regular file"
    finally:
        sock.close()
        # Unblock a reader that a broken open left waiting on the FIFO.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_rotation_skips_fifo(tmp_path):
    old, new = split_lines(read_fixture("two/audit.log.gz"), 2)
    log = tmp_path / "audit.log"
    results: list[Reader] = []

    async def scenario() -> None:
        log.write_bytes(old)
        reader = Reader(log)
        await reader.follower.open()
        await reader.read_available()
        # The file being read is rotated and deleted, so the follower looks
        # for the oldest unread file, and a FIFO is the oldest name.
        log.rename(tmp_path / "audit.log.1")
        log.write_bytes(new)
        (tmp_path / "audit.log.1").unlink()
        os.mkfifo(tmp_path / "audit.log.2")
        await reader.read_available()
        await reader.follower.close()
        results.append(reader)

    thread = threading.Thread(target=anyio.run, args=(scenario,), daemon=True)
    thread.start()
    thread.join(10.0)
    try:
        assert not thread.is_alive(), "the follower blocked on the FIFO"
    finally:
        try:
            os.close(os.open(tmp_path / "audit.log.2", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    (reader,) = results
    assert [(switch.current.name, switch.rotated_away) for switch in reader.switches] == [("audit.log", True)]
    assert reader.counts == reference_counts(old + new)
