"""Raise the kernel's audit backlog and lift its rate limit for a trace, then restore them.

A full backlog makes the kernel either block the traced process (for up to
``backlog_wait_time``) or drop the record, and a rate limit drops records
outright, so a trace runs with a large backlog and no rate limit.

The settings are global, and several traces may run on one host at once. So
each trace takes a *lease* in a small registry under /run/speaker. The first
lease records the original values and applies the trace values, and only the
last lease to end restores the originals. A lease whose process died (its pid
is gone, or was reused by a process with another start time) no longer
counts. A value that someone else changed during the trace is left as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speaker.audit.netlink import AuditStatus, get_status, set_status

DEFAULT_STATE_DIR = Path("/run/speaker")
_STATE_NAME = "audit-settings.json"
_LOCK_NAME = "audit-settings.lock"
_FIELDS = ("backlog_limit", "rate_limit")


@dataclasses.dataclass(frozen=True)
class LeaseOutcome:
    """The change that acquiring or releasing a lease made to the kernel settings."""

    #: Status read before any change.
    before: AuditStatus
    #: Fields set, with their new values.
    changed: dict[str, int]
    #: Leases of other live processes that still hold the settings.
    other_holders: int
    #: Fields left alone at release because their value was no longer the one applied.
    changed_by_others: dict[str, int] = dataclasses.field(default_factory=dict)


class AuditSettingsLease:
    """One trace's hold on raised kernel audit settings.

    ``backlog_limit`` is raised to at least the given number of records (it is
    never lowered) and ``rate_limit`` is set to 0 (no limit). Requests need
    CAP_AUDIT_CONTROL, so the methods raise AuditRequestError without it.
    """

    def __init__(self, backlog_limit: int, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.backlog_limit = backlog_limit
        self.state_dir = state_dir
        self._holder = {"pid": os.getpid(), "start": _start_time(os.getpid()), "token": uuid.uuid4().hex}
        self.active = False

    def acquire(self) -> LeaseOutcome:
        """Apply the trace settings unless another lease already did, and register this lease."""
        with self._locked():
            state = self._load()
            holders = [holder for holder in state.get("holders", []) if _alive(holder)]
            status = get_status()
            current = _values(status)
            if holders:
                original = state["original"]
            elif state and current == state.get("applied"):
                # A trace that died without releasing left its values in
                # place: the original values it recorded are still the ones to restore.
                original = state["original"]
            else:
                original = current
            target = {"backlog_limit": max(current["backlog_limit"], self.backlog_limit), "rate_limit": 0}
            changed = {name: value for name, value in target.items() if current[name] != value}
            if changed:
                set_status(**changed)
            holders.append(self._holder)
            self._save({"original": original, "applied": target, "holders": holders})
            self.active = True
            return LeaseOutcome(before=status, changed=changed, other_holders=len(holders) - 1)

    def release(self) -> LeaseOutcome:
        """Drop this lease; if it was the last, restore the original values that are still as applied."""
        with self._locked():
            state = self._load()
            status = get_status()
            self.active = False
            if not state:
                return LeaseOutcome(before=status, changed={}, other_holders=0)
            holders = [
                holder
                for holder in state.get("holders", [])
                if holder.get("token") != self._holder["token"] and _alive(holder)
            ]
            if holders:
                self._save({**state, "holders": holders})
                return LeaseOutcome(before=status, changed={}, other_holders=len(holders))
            current = _values(status)
            applied = state.get("applied", {})
            original = state.get("original", {})
            restore = {
                name: original[name]
                for name in _FIELDS
                if name in original and current[name] == applied.get(name) and current[name] != original[name]
            }
            others = {name: current[name] for name in _FIELDS if name in applied and current[name] != applied[name]}
            if restore:
                set_status(**restore)
            self._state_path.unlink(missing_ok=True)
            return LeaseOutcome(before=status, changed=restore, other_holders=0, changed_by_others=others)

    def holders(self) -> int:
        """Return the number of live leases in the registry, this one included."""
        with self._locked():
            return sum(1 for holder in self._load().get("holders", []) if _alive(holder))

    @property
    def _state_path(self) -> Path:
        return self.state_dir / _STATE_NAME

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / _LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged registry cannot name the original values; start again from the current ones.
            return {}
        return state if isinstance(state, dict) else {}

    def _save(self, state: dict[str, Any]) -> None:
        temporary = self._state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self._state_path)


def _values(status: AuditStatus) -> dict[str, int]:
    return {name: getattr(status, name) for name in _FIELDS}


def _start_time(pid: int) -> int | None:
    """Return a process's start time in clock ticks since boot, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; fields follow the last ")".
    return int(stat.rpartition(")")[2].split()[19])


def _alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    start = holder.get("start")
    return isinstance(pid, int) and start is not None and _start_time(pid) == start
