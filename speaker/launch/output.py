"""Stream a container's stdout or stderr as lines."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator

import aiodocker
import aiohttp

#: Characters kept of one output line; the rest of a longer line is dropped.
MAX_LINE = 8192


async def output_lines(docker: aiodocker.Docker, container_id: str, stream: str) -> AsyncIterator[str]:
    """Yield the lines a container writes to ``stream`` (``stdout`` or ``stderr``), from its start until it exits.

    Docker frames do not follow line boundaries, so a line can span frames;
    an unfinished last line is yielded when the stream ends.
    """
    container = docker.containers.container(container_id)
    pending = ""
    try:
        async for piece in container.log(stdout=stream == "stdout", stderr=stream == "stderr", follow=True):
            pending += piece
            if "\n" not in pending:
                pending = pending[: MAX_LINE * 2]
                continue
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line.rstrip("\r")[:MAX_LINE]
    except (aiodocker.DockerError, aiohttp.ClientError):
        # The container was removed, or the daemon went away; the event stream reports either.
        pass
    if pending:
        yield pending[:MAX_LINE]


class RecentLines:
    """The last few output lines of a container, for error messages."""

    def __init__(self, size: int = 10) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=size)

    def add(self, stream: str, line: str) -> None:
        self._lines.append(f"{stream}: {line}")

    def text(self) -> str:
        return " | ".join(self._lines) if self._lines else "(no output)"
