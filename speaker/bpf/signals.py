"""Turn the signals that the kernel program saw into SignalRecord events, and remember their slots."""

from __future__ import annotations

from speaker.bpf.clock import monotonic_to_wall
from speaker.bpf.output import SignalSent
from speaker.container_cgroups import CgroupResolver, ProcessGone
from speaker.events import SignalRecord

#: The sending syscalls that each si_code of the program's filter can come
#: from. The tracepoint does not name the syscall, and pidfd_send_signal
#: without a siginfo uses SI_USER like kill.
SYSCALLS_BY_CODE = {
    0: "kill or pidfd_send_signal",
    -1: "rt_sigqueueinfo or pidfd_send_signal",
    -6: "tkill or tgkill",
}

#: Kernel seconds for which a signal's slot is remembered. Counts reach the
#: source within 1.5 periods (at most 90 s) plus the 3 s that counts of an
#: unknown cgroup are held.
SLOT_RETENTION = 120.0


def signal_record(sent: SignalSent, source: str, container_id: str = "") -> SignalRecord:
    """Return the SignalRecord of a signal, on the same clock as the source's SyscallCounts.

    ``classify`` attributes the receiver by its pid again and sets
    ``from_container``, as for the audit sources' records.
    """
    return SignalRecord(
        container_id=container_id,
        pid=sent.pid,
        signal=sent.signal,
        sender_pid=sent.sender_pid,
        sender_comm=sent.sender_comm,
        syscall=SYSCALLS_BY_CODE.get(sent.code, f"si_code {sent.code}"),
        record_time=monotonic_to_wall(sent.kernel_ns / 1e9),
        source=source,
    )


class SignalSlots:
    """The count slots in which a container's process received a signal.

    A stop signal can fall in the middle of a slot, and a server such as
    nginx makes all its shutdown syscalls within a few milliseconds of it.
    The phase machine puts a count without spans that straddles the stop into
    running, so those syscalls would all land there. Counts of a marked slot
    get spans of the whole slot instead, so each of their syscalls goes to
    both phases around a boundary inside the slot.
    """

    def __init__(self, slot_ns: int, resolver: CgroupResolver | None = None) -> None:
        self.slot_ns = slot_ns
        self.resolver = resolver or CgroupResolver()
        #: Slot -> containers whose process received a signal in it. None
        #: stands for every container: the receiver exited before its cgroup was read.
        self._marked: dict[int, set[str | None]] = {}

    def receiver_container(self, pid: int) -> str | None:
        """Return the container of the receiving task, "" for the host, or None when it is gone."""
        try:
            return self.resolver.container_of(pid)
        except ProcessGone:
            return None

    def add(self, sent: SignalSent, container: str | None) -> None:
        """Mark the slot of ``sent`` for ``container`` (None: for every container); host receivers mark nothing."""
        if container == "":
            return
        slot = sent.kernel_ns // self.slot_ns
        self._marked.setdefault(slot, set()).add(container)
        oldest = slot - round(SLOT_RETENTION * 1e9) // self.slot_ns
        for old in [marked for marked in self._marked if marked < oldest]:
            del self._marked[old]

    def marked(self, container: str, slot: int) -> bool:
        containers = self._marked.get(slot)
        return containers is not None and (container in containers or None in containers)
