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
second.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path


@dataclasses.dataclass
class Chunk:
    """Whole lines read from the log."""

    buffer: bytearray
    #: The lines are ``buffer[:end]``.
    end: int
    #: The file the lines came from.
    path: Path


@dataclasses.dataclass
class Switch:
    """The follower finished one file and opened the next."""

    previous: Path
    current: Path
    #: Whether unread files were deleted by rotation in between.
    rotated_away: bool
    #: A partial last line of the finished file, which can never be completed.
    partial_line: bytes


class AuditLogFollower:
    """Follow one audit log file.

    ``read`` returns a Chunk of whole lines, a Switch after a rotation, or
    None when there is nothing new. A partial last line waits for its newline.
    The next ``read`` drops the lines of the previous Chunk and reuses its buffer.
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

    @property
    def current(self) -> Path:
        """The file being read, which is ``path`` until a rotation renames it."""
        return self._current

    async def open(self) -> None:
        """Open ``path`` at its end (or its start). Raises OSError."""
        self._file = io.FileIO(self.path, "rb")
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
        while True:
            if self._have == len(self._buffer):
                # One line longer than the buffer: make room for it.
                self._buffer.extend(bytes(len(self._buffer)))
            view = memoryview(self._buffer)[self._have :]
            size = self._file.readinto(view)
            view.release()
            if not size:
                return None
            start = self._have
            self._have += size
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
            if end == 0:
                continue
            self._returned = end
            return Chunk(self._buffer, end, self._current)

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
        self._have = 0
        self._file.close()
        self._file = io.FileIO(following, "rb")
        opened = os.fstat(self._file.fileno())
        self._identity = (opened.st_dev, opened.st_ino)
        self._seen.add(self._identity)
        self._current = following
        return Switch(previous=previous, current=following, rotated_away=deleted, partial_line=partial)

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
        return names + [self.path]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)
