"""The kernel audit settings, the stop signal rule and the lost counter, as one source uses them during a trace."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio

from speaker.audit.control import AuditSettingsLease
from speaker.audit.netlink import AuditRequestError, AuditStatus, get_status
from speaker.audit.rules import SignalRuleLease
from speaker.errors import ComponentError

#: Consequence logged when the stop signal rule cannot be used.
_WITHOUT_RULE = "the shutdown starts at Docker's kill event, which comes some milliseconds after the signal"


@dataclasses.dataclass
class KernelAudit:
    """Raise the kernel's audit settings for a trace (when ``adjust``), load the stop signal rule (when ``signal_rule``) and watch the lost counter.

    Without CAP_AUDIT_CONTROL, ``start`` raises ComponentError when
    ``adjust`` is true, and otherwise logs that kernel losses go unchecked.
    A stop signal rule that cannot be loaded is logged once, and the trace
    goes on with Docker's kill events.
    """

    adjust: bool
    backlog_limit: int
    log: Any
    signal_rule: bool = False
    lease: AuditSettingsLease | None = None
    rule_lease: SignalRuleLease | None = None
    #: The lost counter at the last check, None when it cannot be read.
    lost: int | None = None
    #: The status read at ``start``, None when it cannot be read.
    status: AuditStatus | None = None

    async def start(self) -> None:
        if self.adjust:
            lease = AuditSettingsLease(self.backlog_limit, enable=self.signal_rule)
            try:
                outcome = await anyio.to_thread.run_sync(lease.acquire)
            except AuditRequestError as exc:
                raise ComponentError(
                    f"cannot change the kernel audit settings ({exc.strerror}): raising the backlog and reading "
                    "the lost counter need CAP_AUDIT_CONTROL. Run SPEAKER as root, or set adjust_kernel = false "
                    "to trace with the current settings"
                ) from None
            self.lease = lease
            self.status = outcome.before
            self.lost = outcome.before.lost
            if outcome.changed:
                self.log.info("audit_settings_raised", **outcome.changed, other_traces=outcome.other_holders)
            enabled = outcome.changed.get("enabled", outcome.before.enabled)
        else:
            try:
                self.status = await anyio.to_thread.run_sync(get_status)
            except AuditRequestError as exc:
                self.log.warning(
                    "kernel_lost_unchecked",
                    error=exc.strerror,
                    detail="records the kernel drops will go unnoticed; grant CAP_AUDIT_CONTROL to check them",
                )
                enabled = None
            else:
                self.lost = self.status.lost
                enabled = self.status.enabled
        if self.signal_rule:
            await self._load_signal_rule(enabled)

    async def _load_signal_rule(self, enabled: int | None) -> None:
        if enabled == 0:
            self.log.warning(
                "stop_signal_rule_unavailable",
                error="audit is disabled, so the kernel makes no syscall records",
                consequence=_WITHOUT_RULE,
                fix="enable audit (auditctl -e 1), or set adjust_kernel = true so that the trace enables it",
            )
            return
        lease = SignalRuleLease()
        try:
            others = await anyio.to_thread.run_sync(lease.acquire)
        except AuditRequestError as exc:
            self.log.warning(
                "stop_signal_rule_unavailable",
                error=f"loading the audit rule failed: {exc.strerror}",
                consequence=_WITHOUT_RULE,
                fix="run SPEAKER as root (the rule needs CAP_AUDIT_CONTROL), or set stop_signals = false",
            )
            return
        self.rule_lease = lease
        self.log.info("stop_signal_rule_loaded", other_traces=others)

    async def lost_increase(self) -> int:
        """Return how much the kernel's lost counter rose since the last call (0 when it cannot be read)."""
        if self.lost is None:
            return 0
        try:
            status = await anyio.to_thread.run_sync(get_status)
        except AuditRequestError as exc:
            self.log.warning("kernel_lost_check_failed", error=exc.strerror)
            return 0
        increase = status.lost - self.lost
        self.lost = status.lost
        return max(increase, 0)

    async def stop(self) -> None:
        """Release the rule and settings leases; the last trace on the host deletes the rule and restores the settings."""
        failures = []
        rule_lease, self.rule_lease = self.rule_lease, None
        if rule_lease is not None and rule_lease.active:
            try:
                others = await anyio.to_thread.run_sync(rule_lease.release)
            except AuditRequestError as exc:
                failures.append(f"cannot delete the stop signal audit rule: {exc.strerror}; delete it with auditctl -D -k speaker-stop-signal")
            else:
                if others:
                    self.log.info("stop_signal_rule_kept", other_traces=others)
                else:
                    self.log.info("stop_signal_rule_deleted")
        lease, self.lease = self.lease, None
        if lease is not None and lease.active:
            try:
                outcome = await anyio.to_thread.run_sync(lease.release)
            except AuditRequestError as exc:
                failures.append(f"cannot restore the kernel audit settings: {exc.strerror}; check them with auditctl -s")
            else:
                if outcome.changed:
                    self.log.info("audit_settings_restored", **outcome.changed)
                elif outcome.other_holders:
                    self.log.info("audit_settings_kept", other_traces=outcome.other_holders)
                if outcome.changed_by_others:
                    self.log.warning("audit_settings_changed_by_others", **outcome.changed_by_others)
        if failures:
            raise ComponentError("; ".join(failures))


#: Detail of a kernel_lost RecordLoss.
KERNEL_LOST_DETAIL = (
    "the kernel's audit lost counter rose (backlog full or rate limit); it counts every audit user on the host"
)
#: Detail of a serial_gap RecordLoss.
SERIAL_GAP_DETAIL = "serial numbers that never arrived"
