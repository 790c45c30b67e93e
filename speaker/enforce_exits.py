"""Judge how each enforced container ended, so that a crash or a seccomp kill is reported as a failure.

The ``enforce`` stage feeds ``ExitWatch`` the lifecycle events and phase
changes it receives and the Violations it emits. When a container exits,
``ExitWatch`` records the phase it was in, and ``problems`` then returns one
sentence per container that failed under enforcement:

* an exit with code 159 (128 + SIGSYS): the kernel killed a process because
  of a seccomp rule, which is the filter's default action for a syscall that
  no phase list allows. The kernel applies it without notifying the
  supervisor. Only the kernel's audit record of the kill names the syscall;
* any other non-zero exit before a stop was requested (Docker's kill or stop
  event, or the shutdown phase). Exit codes after a stop are the
  application's own, such as 137 after Docker's SIGKILL.

A pipeline with an audit source and ``classify`` upstream (such as
pipelines/enforce-audited.toml) also delivers the kernel's SECCOMP audit
records. ``kill_violation`` turns each kill among them into a Violation with
action ``killed``, so a killed ``docker exec`` process or server worker is
reported too, and the message of a 159 exit names the syscall. Without those
records, only the exit code of init shows a kill.
"""

from __future__ import annotations

import collections
import dataclasses
import signal

from speaker.compile.actions import RET_KILL_PROCESS, RET_KILL_THREAD
from speaker.events import (
    ContainerAction,
    ContainerEvent,
    ContainerOutput,
    Event,
    Phase,
    PhaseChange,
    SyscallRecord,
    Violation,
)
from speaker.launch.output import RecentLines

#: Exit status of a process killed by SIGSYS, as Docker reports it (128 + 31 on x86_64).
SIGSYS_EXIT = 128 + signal.SIGSYS
#: Output lines of a crashed container that its message quotes.
OUTPUT_LINES = 3
#: Distinct (syscall, action, phase) entries that a message names before "and N more".
NAMED_VIOLATIONS = 3
#: SECCOMP_RET_ACTION_FULL: the action bits of an audit record's ``code``, without the errno or data bits.
ACTION_MASK = 0xFFFF0000
#: Actions whose audit record means that the kernel killed the caller
#: (include/uapi/linux/seccomp.h: SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_KILL_THREAD).
KILL_ACTIONS = frozenset({RET_KILL_PROCESS, RET_KILL_THREAD})
#: Audit serials remembered per watch, to report a kill once when the phase
#: machine sends its record in two phases (a call in the tick of a kernel stop).
SEEN_SERIALS = 1024


@dataclasses.dataclass
class _Life:
    """State of one enforced container: its phase, stop request, failed exits, violations and last output."""

    name: str = ""
    #: True once a lifecycle event or phase change came for it, which makes it a container the stage enforces.
    enforced: bool = False
    phase: Phase | None = None
    stop_requested: bool = False
    #: Failed exits, from Docker's die events: exit code, phase, and whether a stop came first.
    failures: list[tuple[int, Phase, bool]] = dataclasses.field(default_factory=list)
    violations: collections.Counter[tuple[str, str, str]] = dataclasses.field(default_factory=collections.Counter)
    #: Syscalls of the kills that the kernel's audit records reported.
    audit_kills: set[str] = dataclasses.field(default_factory=set)
    output: RecentLines = dataclasses.field(default_factory=lambda: RecentLines(OUTPUT_LINES))


class ExitWatch:
    """Exits and violations of the containers that an enforce stage receives events of.

    ``violations_path`` is the file a violations sink writes, named in the
    messages, or empty when the pipeline has none. ``default_kills`` is true when
    the filter's default action kills the process (``kill-process``),
    which makes SIGSYS the sign of an unlisted syscall.
    """

    def __init__(self, log: object, violations_path: str = "", default_kills: bool = True) -> None:
        self.log = log
        self.violations_path = violations_path
        self.default_kills = default_kills
        self.lives: dict[str, _Life] = {}
        #: Audit records that were not a kill in an enforced container, by reason, for one summary line.
        self.ignored_records: collections.Counter[str] = collections.Counter()
        self._seen_serials: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._logged_kills: set[tuple[str, str, Phase]] = set()

    def _life(self, container_id: str) -> _Life:
        life = self.lives.get(container_id)
        if life is None:
            life = self.lives[container_id] = _Life()
        return life

    def observe(self, event: Event) -> None:
        """Record the state change of its container that one event, received or emitted by the stage, carries."""
        if not event.container_id:
            return
        if isinstance(event, Violation):
            self._life(event.container_id).violations[(event.syscall, event.action, event.phase.value)] += 1
        elif isinstance(event, PhaseChange):
            life = self._life(event.container_id)
            life.enforced = True
            life.phase = event.phase
        elif isinstance(event, ContainerOutput):
            self._life(event.container_id).output.add(event.stream, event.line)
        elif isinstance(event, ContainerEvent):
            self._lifecycle(event)

    def _lifecycle(self, event: ContainerEvent) -> None:
        life = self._life(event.container_id)
        life.enforced = True
        if event.name:
            life.name = event.name
        if event.action is ContainerAction.STOP:
            life.stop_requested = True
        elif event.action is ContainerAction.KILL:
            # Like the phase machine, only the stop signal and SIGKILL stop the
            # container. A crash after another signal (nginx's SIGHUP reload) is reported.
            life.stop_requested |= event.signal in (event.stop_signal or signal.SIGTERM, signal.SIGKILL)
        elif event.action is ContainerAction.START:
            life.stop_requested = False
        elif event.action is ContainerAction.DIE:
            code = event.exit_code
            phase = life.phase or Phase.BOOTING
            stopped = life.stop_requested or life.phase is Phase.SHUTDOWN
            if code is None or code == 0 or (stopped and code != SIGSYS_EXIT):
                return
            life.failures.append((code, phase, stopped))
            self.log.error(
                "enforced_container_failed",
                container=event.container_id[:12],
                name=life.name,
                exit_code=code,
                phase=phase.value,
                violations=sum(life.violations.values()),
            )

    def kill_violation(self, record: SyscallRecord) -> Violation | None:
        """Turn an audit record of a kill in an enforced container into a Violation, and return None for other records.

        Other records (LOG records of traced containers, ERRNO records, records
        of containers the stage does not enforce) are counted in
        ``ignored_records``. A kill already reported returns None too.
        """
        # TODO: the audit parser gives action 0 (SECCOMP_RET_KILL_THREAD) to a line that
        # ends before ``code=`` too, so such a damaged record is reported as a kill.
        if record.action & ACTION_MASK not in KILL_ACTIONS:
            self.ignored_records["not_a_kill"] += 1
            return None
        life = self.lives.get(record.container_id)
        if life is None or not life.enforced:
            self.ignored_records["not_enforced"] += 1
            return None
        if record.serial:
            key = (record.container_id, record.serial)
            if key in self._seen_serials:
                return None
            self._seen_serials[key] = None
            if len(self._seen_serials) > SEEN_SERIALS:
                self._seen_serials.popitem(last=False)
        phase = record.phase or life.phase or Phase.BOOTING
        syscall = record.name or f"nr {record.nr}"
        life.audit_kills.add(syscall)
        if (record.container_id, syscall, phase) not in self._logged_kills:
            self._logged_kills.add((record.container_id, syscall, phase))
            self.log.warning(
                "process_killed",
                container=record.container_id[:12],
                phase=phase.value,
                syscall=syscall,
                arch=record.arch,
                pid=record.pid,
                comm=record.comm,
                action=hex(record.action),
            )
        return Violation(
            container_id=record.container_id,
            wall_time=record.record_time or record.wall_time,
            phase=phase,
            pid=record.pid,
            comm=record.comm,
            syscall=syscall,
            arch=record.arch,
            action="killed",
            nr=record.nr,
        )

    def problems(self) -> list[str]:
        """Return one message per container that crashed or was killed by SIGSYS under enforcement."""
        messages = []
        for container_id, life in self.lives.items():
            for code, phase, stopped in life.failures:
                messages.append(self._message(container_id, life, code, phase, stopped))
        return messages

    def _message(self, container_id: str, life: _Life, code: int, phase: Phase, stopped: bool) -> str:
        name = life.name or container_id[:12]
        when = "during shutdown" if phase is Phase.SHUTDOWN else f"while {phase.value}"
        parts = [f"container {name} exited with code {code} {when} under enforcement"]
        if code == SIGSYS_EXIT:
            if life.audit_kills:
                parts.append(
                    "a process was killed by SIGSYS because it made a syscall that no phase list allows; the "
                    f"kernel's audit records name {', '.join(sorted(life.audit_kills))}"
                )
            elif self.default_kills:
                parts.append(
                    "a process was killed by SIGSYS because it made a syscall that no phase list allows (the "
                    "filter's default action, which SPEAKER does not see); the kernel's audit log names the "
                    "syscall (ausearch -m SECCOMP -i with auditd, dmesg without)"
                )
            else:
                parts.append("a process was killed by SIGSYS, the signal of a seccomp kill action")
        parts.append(self._violations_text(life))
        if not stopped and code != SIGSYS_EXIT:
            parts.append(f"last output: {life.output.text()}")
        return "; ".join(parts)

    def _violations_text(self, life: _Life) -> str:
        total = sum(life.violations.values())
        if total == 0:
            return "no violation was reported"
        entries = []
        for (syscall, action, phase), count in life.violations.most_common(NAMED_VIOLATIONS):
            times = f" {count} times" if count > 1 else ""
            entries.append(f"{syscall} {action} in {phase}{times}")
        rest = len(life.violations) - len(entries)
        if rest:
            entries.append(f"and {rest} more")
        verb = "violation was" if total == 1 else "violations were"
        text = f"{total} {verb} reported ({', '.join(entries)})"
        if self.violations_path:
            text += f"; see {self.violations_path}"
        return text
