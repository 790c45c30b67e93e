"""AuditLogFollower across auditd-style rotations, on captured log content.

The tests rename and delete files the way auditd rotates (audit.log ->
audit.log.1 -> ..., the oldest deleted once num_logs files exist), while the
follower has a file open.
"""

from __future__ import annotations

import collections
from pathlib import Path

import anyio

from speaker.audit.chunks import ChunkParser
from speaker.audit.follow import AuditLogFollower, Chunk, Switch
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
