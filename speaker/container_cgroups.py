"""Find the container a process belongs to from /proc/PID/cgroup.

Docker puts every process of a container in a cgroup named after the
container's 64-hex-digit id:

* cgroup v1 with the cgroupfs driver: lines such as ``4:memory:/docker/ID``;
* cgroup v2 with the systemd driver: ``0::/system.slice/docker-ID.scope``;
* the same names nested deeper, when the container makes its own
  sub-cgroups (``/system.slice/docker-ID.scope/init.scope``) or runs inside
  another manager (``/kubepods/.../cri-containerd-ID.scope``).

The id that follows a known runtime prefix is the container's. Paths are
those seen from the host's cgroup namespace, so SPEAKER must run on the host.
"""

from __future__ import annotations

import os
import re

#: Matches a container id after a runtime's cgroup prefix.
DEFAULT_PATTERN = r"(?:/docker[-/]|/libpod-|/cri-containerd-|/crio-)([0-9a-f]{64})(?:\.scope)?(?=/|$)"


class ProcessGone(Exception):
    """The process exited, so its /proc entry no longer exists."""


class CgroupResolver:
    """Read container ids from /proc/PID/cgroup text."""

    def __init__(self, pattern: str = DEFAULT_PATTERN, proc: str = "/proc") -> None:
        self.pattern = re.compile(pattern, re.MULTILINE)
        if self.pattern.groups != 1:
            raise ValueError(f"the cgroup pattern {pattern!r} must have exactly one group, which captures the id")
        self.proc = proc

    def container_of_text(self, text: str) -> str:
        """Return the container id in the text of a /proc/PID/cgroup file, or "" for a host process."""
        found = ""
        for match in self.pattern.finditer(text):
            # The innermost (last) id wins, for containers nested in containers.
            found = match.group(1)
        return found

    def container_of(self, pid: int) -> str:
        """Return the container id of ``pid``, or "" for a host process. Raises ProcessGone."""
        try:
            fd = os.open(f"{self.proc}/{pid}/cgroup", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        try:
            data = os.read(fd, 65536)
        except ProcessLookupError:
            raise ProcessGone(pid) from None
        finally:
            os.close(fd)
        return self.container_of_text(data.decode("utf-8", "replace"))


def start_time(pid: int, proc: str = "/proc") -> float:
    """Return the start time of ``pid`` in seconds since boot (``starttime`` of /proc/PID/stat). Raises ProcessGone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    # The command name in brackets may contain spaces and brackets, so the
    # fields are counted from the last ")". starttime is field 22.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19]) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
