"""Read auditd's log file as it grows, across auditd's log rotation.

auditd rotates by renaming ``audit.log.N-1`` to ``audit.log.N`` down to
``audit.log`` to ``audit.log.1``, deleting the oldest file once ``num_logs``
files exist, and opening a new ``audit.log``. The follower keeps its file
open, so after a rotation it still reads the renamed file to its end, and
then continues with the next newer file. If the file it was reading has been
deleted, the files between it and the oldest one left were deleted unread:
the follower then continues with the oldest remaining file and reports that
records were rotated away.

The file is read with plain blocking calls on the event loop's thread. The
lines are ones auditd has just written, so they come from the page cache, at
about 0.1 ms per MiB. Handing each read to a worker thread cost more than
that: on a 2-core test host the source parsed about 10% fewer records per
second. Only regular files are opened, because a read from a FIFO or a
device can block the event loop for ever.

A line longer than MAX_LINE_LENGTH is skipped up to its newline without being
kept, and reported as a LongLine. So the buffer stays at most ``read_size`` or
twice MAX_LINE_LENGTH bytes, whichever is larger.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
from pathlib import Path

#: Maximum length of a line, without its newline, that the follower keeps.
#: auditd receives records in buffers of MAX_AUDIT_MESSAGE_LENGTH, 8970 bytes
#: (libaudit.h), so this leaves more than 100 times that for its ENRICHED fields.
MAX_LINE_LENGTH = 1 << 20
#: Bytes of a skipped line kept for the log.
EXAMPLE_LENGTH = 160


class NotRegularFileError(OSError):
    """The log path names a FIFO, a device, a socket or a directory instead of a regular file."""


@dataclasses.dataclass
class LongLine:
    """A line longer than MAX_LINE_LENGTH that was skipped."""

    #: Bytes of the line with its newline, or up to the end of the file when it has none.
    size: int
    #: Its first EXAMPLE_LENGTH bytes.
    example: bytes
    path: Path


@dataclasses.dataclass
class Chunk:
    """Whole lines read from the log."""

    buffer: bytearray
    #: The lines are ``buffer[:end]``.
    end: int
    #: The file the lines came from.
    path: Path
    #: Lines longer than MAX_LINE_LENGTH that were skipped while reading these lines.
    long_lines: list[LongLine] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Switch:
    """The follower finished one file and opened the next."""

    previous: Path
    current: Path
    #: Whether unread files were deleted by rotation in between.
    rotated_away: bool
    #: A partial last line of the finished file, which can never be completed.
    partial_line: bytes
    #: A partial last line longer than MAX_LINE_LENGTH, which was skipped instead.
    long_line: LongLine | None = None


class AuditLogFollower:
    """Follow one audit log file.

    ``read`` returns a Chunk of whole lines, a Switch after a rotation, or
    None when there is nothing new. A partial last line waits for its newline.
    The next ``read`` drops the lines of the previous Chunk and reuses its buffer.
    A Chunk may contain no lines and only skipped long lines.
    """

    def __init__(self, path: Path, *, from_start: bool = False, read_size: int = 1 << 20) -> None:
        self.path = path
        self.from_start = from_start
        self.read_size = read_size
        self._file: io.FileIO | None = None
        self._current = path
        self._identity: tuple[int, int] = (0, 0)
        self._seen: set[tuple[int, int]] = set()
        self._buffer = bytearray(read_size)
        self._have = 0
        self._returned = 0
        self._skip_partial = False
        # The line being skipped because it is longer than MAX_LINE_LENGTH.
        self._skipping: LongLine | None = None

    @property
    def current(self) -> Path:
        """The file being read, which is ``path`` until a rotation renames it."""
        return self._current

    async def open(self) -> None:
        """Open ``path`` at its end (or its start). Raises NotRegularFileError or another OSError."""
        self._file = _open_regular(self.path)
        status = os.fstat(self._file.fileno())
        self._identity = (status.st_dev, status.st_ino)
        self._seen.add(self._identity)
        if not self.from_start and status.st_size:
            self._file.seek(status.st_size - 1)
            # The line being written at the end belongs to a record from before the trace.
            self._skip_partial = self._file.read(1) != b"\n"

    def leftover(self) -> bytes:
        """Return the partial last line that no newline has completed yet."""
        return bytes(self._buffer[self._returned : self._have])

    def take_long_line(self) -> LongLine | None:
        """Return the long line being skipped, which no newline has ended yet, and stop skipping it."""
        long_line, self._skipping = self._skipping, None
        return long_line

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def read(self) -> Chunk | Switch | None:
        if self._returned:
            rest = self._have - self._returned
            self._buffer[:rest] = self._buffer[self._returned : self._have]
            self._have = rest
            self._returned = 0
        chunk = await self._read_lines()
        if chunk is not None:
            return chunk
        return await self._follow_rotation()

    async def _read_lines(self) -> Chunk | None:
        assert self._file is not None
        long_lines: list[LongLine] = []
        while True:
            if self._have == len(self._buffer):
                # The buffer contains one partial line of at most MAX_LINE_LENGTH
                # bytes, because a longer one is skipped. Make room for the rest of it.
                self._buffer.extend(bytes(len(self._buffer)))
            view = memoryview(self._buffer)[self._have :]
            size = self._file.readinto(view)
            view.release()
            if not size:
                return Chunk(self._buffer, 0, self._current, long_lines) if long_lines else None
            start = self._have
            self._have += size
            if self._skipping is not None:
                newline = self._buffer.find(b"\n", start, self._have)
                if newline < 0:
                    self._skipping.size += size
                    self._have = start
                    continue
                self._skipping.size += newline + 1 - start
                long_lines.append(self._skipping)
                self._skipping = None
                self._drop(start, newline + 1)
            if self._skip_partial:
                newline = self._buffer.find(b"\n", start, self._have)
                if newline < 0:
                    self._have = 0
                    continue
                self._buffer[: self._have - newline - 1] = self._buffer[newline + 1 : self._have]
                self._have -= newline + 1
                self._skip_partial = False
                start = 0
            end = self._buffer.rfind(b"\n", start, self._have) + 1
            if end:
                end = self._drop_long_lines(end, long_lines)
            if self._have - end > MAX_LINE_LENGTH:
                # The partial last line is already too long: skip it up to its newline.
                example = bytes(self._buffer[end : end + EXAMPLE_LENGTH])
                self._skipping = LongLine(self._have - end, example, self._current)
                self._have = end
            if end == 0:
                continue
            self._returned = end
            return Chunk(self._buffer, end, self._current, long_lines)

    def _drop_long_lines(self, end: int, long_lines: list[LongLine]) -> int:
        """Remove the lines longer than MAX_LINE_LENGTH from ``buffer[:end]``, add them to ``long_lines``, return the new end."""
        buffer = self._buffer
        position = _first_long_line(buffer, 0, end)
        while position >= 0:
            stop = buffer.index(b"\n", position, end) + 1
            long_lines.append(LongLine(stop - position, bytes(buffer[position : position + EXAMPLE_LENGTH]), self._current))
            self._drop(position, stop)
            end -= stop - position
            position = _first_long_line(buffer, position, end)
        return end

    def _drop(self, start: int, stop: int) -> None:
        """Remove ``buffer[start:stop]``, moving the bytes after it down."""
        rest = self._have - stop
        self._buffer[start : start + rest] = self._buffer[stop : self._have]
        self._have = start + rest

    async def _follow_rotation(self) -> Switch | None:
        """After the end of the current file, move to the next file if auditd has rotated."""
        assert self._file is not None
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            # auditd renamed the log and has not created the new one yet.
            return None
        if (status.st_dev, status.st_ino) == self._identity:
            return None
        # auditd writes nothing more to a renamed file; read what it wrote before renaming it.
        chunk = await self._read_lines()
        if chunk is not None:
            return chunk
        deleted = os.fstat(self._file.fileno()).st_nlink == 0
        following = self._next_file(deleted)
        if following is None:
            return None
        previous = self._current
        partial = bytes(self._buffer[: self._have])
        long_line = self.take_long_line()
        self._have = 0
        self._file.close()
        self._file = _open_regular(following)
        opened = os.fstat(self._file.fileno())
        self._identity = (opened.st_dev, opened.st_ino)
        self._seen.add(self._identity)
        self._current = following
        return Switch(
            previous=previous, current=following, rotated_away=deleted, partial_line=partial, long_line=long_line
        )

    def _next_file(self, deleted: bool) -> Path | None:
        """Return the file written after the current one: the next newer name, or the oldest unread one if it was deleted."""
        names = self._rotated_names()
        if not deleted:
            for index, name in enumerate(names):
                if _identity(name) == self._identity:
                    return names[index + 1] if index + 1 < len(names) else None
        # Deleted, or moved away under another name: continue with the oldest unread file.
        for name in names:
            identity = _identity(name)
            if identity is not None and identity not in self._seen:
                return name
        return None

    def _rotated_names(self) -> list[Path]:
        """Return the existing log files, oldest first: audit.log.N, ..., audit.log.1, audit.log."""
        numbered = []
        prefix = self.path.name + "."
        try:
            entries = os.listdir(self.path.parent)
        except OSError:
            entries = []
        for entry in entries:
            suffix = entry[len(prefix) :] if entry.startswith(prefix) else ""
            if suffix.isdigit():
                numbered.append((int(suffix), self.path.parent / entry))
        names = [name for _, name in sorted(numbered, reverse=True)]
        return [name for name in names + [self.path] if _identity(name) is not None]


def _identity(path: Path) -> tuple[int, int] | None:
    """Return the (device, inode) of a regular file, or None for anything else."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return (status.st_dev, status.st_ino)


def _open_regular(path: Path) -> io.FileIO:
    """Open a regular file for reading without blocking on a FIFO or device. Raises NotRegularFileError or OSError."""
    # stat first: opening a socket fails with ENXIO, which would hide the reason.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFileError(f"{path}: not a regular file")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # The path may have been replaced between the stat and the open.
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise NotRegularFileError(f"{path}: not a regular file")
        os.set_blocking(descriptor, True)
        return io.FileIO(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


def _first_long_line(buffer: bytearray, start: int, end: int) -> int:
    """Return where the first line in ``buffer[start:end]`` longer than MAX_LINE_LENGTH starts, or -1.

    Each ``rfind`` jumps to the last newline within MAX_LINE_LENGTH + 1 bytes,
    so a chunk of N bytes takes about N / MAX_LINE_LENGTH + 1 searches.
    """
    position = start
    while position < end:
        newline = buffer.rfind(b"\n", position, min(end, position + MAX_LINE_LENGTH + 1))
        if newline < 0:
            return position
        position = newline + 1
    return -1
