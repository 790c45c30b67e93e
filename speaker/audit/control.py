"""Raise the kernel's audit backlog and lift its rate limit for a trace, then restore them.

A full backlog makes the kernel either block the traced process (for up to
``backlog_wait_time``) or drop the record, and a rate limit drops records
outright, so a trace runs with a large backlog and no rate limit. A trace
that records stop signals with an audit rule also needs audit enabled,
because the kernel makes no syscall records while it is disabled.

The settings are global, and several traces may run on one host at once. So
each trace takes a *lease* in a registry under /run/speaker
(``speaker.audit.leases``). The first lease records the original values and
applies the trace values, and only the last lease to end restores the
originals. A value that someone else changed during the trace is left as it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from speaker.audit.leases import DEFAULT_STATE_DIR, LeaseRegistry
from speaker.audit.netlink import AuditStatus, get_status, set_status

_REGISTRY_NAME = "audit-settings"
_FIELDS = ("backlog_limit", "rate_limit", "enabled")
#: ``enabled`` value of a kernel whose audit configuration is locked until reboot.
AUDIT_LOCKED = 2


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
    never lowered) and ``rate_limit`` is set to 0 (no limit). With ``enable``,
    audit is enabled if it is disabled (unless it is locked). Requests need
    CAP_AUDIT_CONTROL, so the methods raise AuditRequestError without it.
    """

    def __init__(self, backlog_limit: int, state_dir: Path = DEFAULT_STATE_DIR, *, enable: bool = False) -> None:
        self.backlog_limit = backlog_limit
        self.enable = enable
        self.registry = LeaseRegistry(_REGISTRY_NAME, state_dir)
        self.active = False

    def acquire(self) -> LeaseOutcome:
        """Apply the trace settings unless another lease already did, and register this lease."""
        registry = self.registry
        with registry.locked():
            state = registry.load()
            holders = registry.live_holders(state)
            status = get_status()
            current = _values(status)
            previous_applied = state.get("applied", {})
            if holders:
                original = state["original"]
            elif state and all(current.get(name) == value for name, value in previous_applied.items()):
                # A trace that died without releasing left its values in
                # place: the original values it recorded are still the ones to restore.
                original = state["original"]
            else:
                original = current
            target = {"backlog_limit": max(current["backlog_limit"], self.backlog_limit), "rate_limit": 0}
            if self.enable and current["enabled"] not in (1, AUDIT_LOCKED):
                target["enabled"] = 1
            changed = {name: value for name, value in target.items() if current[name] != value}
            if changed:
                set_status(**changed)
            applied = {**previous_applied, **target} if holders else target
            holders.append(registry.holder)
            registry.save({"original": {**current, **original}, "applied": applied, "holders": holders})
            self.active = True
            return LeaseOutcome(before=status, changed=changed, other_holders=len(holders) - 1)

    def release(self) -> LeaseOutcome:
        """Drop this lease; if it was the last, restore the original values that are still as applied."""
        registry = self.registry
        with registry.locked():
            state = registry.load()
            status = get_status()
            self.active = False
            if not state:
                return LeaseOutcome(before=status, changed={}, other_holders=0)
            holders = registry.live_holders(state, without_self=True)
            if holders:
                registry.save({**state, "holders": holders})
                return LeaseOutcome(before=status, changed={}, other_holders=len(holders))
            current = _values(status)
            applied = state.get("applied", {})
            original = state.get("original", {})
            restore = {
                name: original[name]
                for name in _FIELDS
                if name in original and name in applied and current[name] == applied[name] and current[name] != original[name]
            }
            others = {name: current[name] for name in _FIELDS if name in applied and current[name] != applied[name]}
            if restore:
                set_status(**restore)
            registry.remove()
            return LeaseOutcome(before=status, changed=restore, other_holders=0, changed_by_others=others)

    def holders(self) -> int:
        """Return the number of live leases in the registry, this one included."""
        with self.registry.locked():
            return len(self.registry.live_holders(self.registry.load()))

    @property
    def state_dir(self) -> Path:
        return self.registry.state_dir


def _values(status: AuditStatus) -> dict[str, int]:
    return {name: getattr(status, name) for name in _FIELDS}
