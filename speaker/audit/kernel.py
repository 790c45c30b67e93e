"""The kernel audit settings and lost counter, as one audit source uses them during a trace."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio

from speaker.audit.control import AuditSettingsLease
from speaker.audit.netlink import AuditRequestError, AuditStatus, get_status
from speaker.errors import ComponentError


@dataclasses.dataclass
class KernelAudit:
    """Raise the kernel's audit settings for a trace (when ``adjust``) and watch its lost counter.

    Without CAP_AUDIT_CONTROL, ``start`` raises ComponentError when
    ``adjust`` is true, and otherwise logs that kernel losses go unchecked.
    """

    adjust: bool
    backlog_limit: int
    log: Any
    lease: AuditSettingsLease | None = None
    #: The lost counter at the last check, None when it cannot be read.
    lost: int | None = None
    #: The status read at ``start``, None when it cannot be read.
    status: AuditStatus | None = None

    async def start(self) -> None:
        if self.adjust:
            lease = AuditSettingsLease(self.backlog_limit)
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
            return
        try:
            self.status = await anyio.to_thread.run_sync(get_status)
        except AuditRequestError as exc:
            self.log.warning(
                "kernel_lost_unchecked",
                error=exc.strerror,
                detail="records the kernel drops will go unnoticed; grant CAP_AUDIT_CONTROL to check them",
            )
            return
        self.lost = self.status.lost

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
        """Release the lease; the last trace on the host restores the original settings."""
        lease, self.lease = self.lease, None
        if lease is None or not lease.active:
            return
        try:
            outcome = await anyio.to_thread.run_sync(lease.release)
        except AuditRequestError as exc:
            raise ComponentError(
                f"cannot restore the kernel audit settings: {exc.strerror}; check them with auditctl -s"
            ) from None
        if outcome.changed:
            self.log.info("audit_settings_restored", **outcome.changed)
        elif outcome.other_holders:
            self.log.info("audit_settings_kept", other_traces=outcome.other_holders)
        if outcome.changed_by_others:
            self.log.warning("audit_settings_changed_by_others", **outcome.changed_by_others)


#: Detail of a kernel_lost RecordLoss.
KERNEL_LOST_DETAIL = (
    "the kernel's audit lost counter rose (backlog full or rate limit); it counts every audit user on the host"
)
#: Detail of a serial_gap RecordLoss.
SERIAL_GAP_DETAIL = "serial numbers that never arrived"
