"""A registry of the traces that hold a host-wide audit change, shared through a file.

Kernel audit settings and rules are global, and several traces may run on one
host at once. Each change (raised settings, an audit rule) has a registry
file under /run/speaker that lists its *holders*. The first holder makes the
change and the last one to leave undoes it. A holder whose process died (its
pid is gone, or belongs to a process with another start time) no longer
counts, so a crashed trace cannot keep a change in place forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/run/speaker")


class LeaseRegistry:
    """One registry file, ``STATE_DIR/NAME.json``, guarded by ``STATE_DIR/NAME.lock``."""

    def __init__(self, name: str, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.state_dir = state_dir
        self.path = state_dir / f"{name}.json"
        self._lock_path = state_dir / f"{name}.lock"
        #: This lease's entry in the ``holders`` list.
        self.holder: dict[str, Any] = {"pid": os.getpid(), "start": start_time(os.getpid()), "token": uuid.uuid4().hex}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's lock, so that a read, change and write of it is atomic."""
        # 0700: /run/speaker also contains the supervisor's socket, which
        # rejects a directory that other users can enter.
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> dict[str, Any]:
        """Return the registry's content, or {} when it is missing or damaged."""
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged registry names no live holder; start again from the kernel's state.
            return {}
        return state if isinstance(state, dict) else {}

    def save(self, state: dict[str, Any]) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def live_holders(self, state: dict[str, Any], *, without_self: bool = False) -> list[dict[str, Any]]:
        """Return the holders in ``state`` whose processes still run, this lease's own entry left out on request."""
        return [
            holder
            for holder in state.get("holders", [])
            if alive(holder) and not (without_self and holder.get("token") == self.holder["token"])
        ]


def start_time(pid: int) -> int | None:
    """Return a process's start time in clock ticks since boot, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; fields follow the last ")".
    return int(stat.rpartition(")")[2].split()[19])


def alive(holder: dict[str, Any]) -> bool:
    """Return whether the process of a registry entry still runs."""
    pid = holder.get("pid")
    start = holder.get("start")
    return isinstance(pid, int) and start is not None and start_time(pid) == start
