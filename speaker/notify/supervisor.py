"""The notify back end of enforcement: respond to each container's seccomp notifications by its phase.

``NotifySupervisor`` is the work of the ``supervisor`` stage and of the
``enforce`` stage with ``backend = "notify"``. It lives here, outside both
stages, so that they share it without importing each other.
docs/enforcement.md has the details.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import aiodocker
import anyio

from speaker.compile.actions import ALLOW, NOTIFY, parse_errno
from speaker.compile.arches import UnknownSyscall
from speaker.compile.plan import EmptyPhase, FilterPlan, arch_phase_lists, notify_plan
from speaker.component import Input, Output
from speaker.enforce_profile import compile_settings, load_enforced_lists, write_seccomp_json
from speaker.errors import ComponentError
from speaker.events import CompiledFilter, ContainerAction, ContainerEvent, Event, Phase, PhaseChange
from speaker.notify.agent import AgentSettings, NotifyAgent
from speaker.notify.delivery import DEFAULT_RUNTIME_NAME, choose_delivery
from speaker.notify.ioctl import check_kernel_layout
from speaker.notify.policy import EXEC_SYSCALLS, PhasePolicy
from speaker.options import Duration, OptionError, option

DEFAULT_SOCKET = Path("/run/speaker/supervisor.sock")
NOTIFY_LAYOUTS = ("notify", "notify-exact")


@dataclasses.dataclass(frozen=True)
class SupervisorOptions:
    socket: Path = option(
        DEFAULT_SOCKET,
        help="Unix socket on which the OCI runtime hands over listener fds. Its directory is created "
        "with mode 0700 and must be root-only. It must match the profile's listenerPath or the --socket "
        "given to `python -m speaker install-runtime`.",
    )
    mode: Literal["enforce", "complain"] = option(
        "enforce", help='"enforce" denies syscalls outside the current phase; "complain" allows them and reports them.'
    )
    deny_action: Literal["errno", "kill"] = option(
        "errno",
        help="What a syscall gets in enforce mode when another phase lists it but the current one does not: "
        '"errno" fails it with EPERM, "kill" kills its process.',
    )
    profile: str = option(
        "",
        help="Profile whose phase lists to enforce: a profile directory, a profile.json or a directory of "
        "phase lists. Empty: use the CompiledFilter events of a filter_compile stage (notify back end only).",
    )
    exact: bool = option(
        False,
        help="With `profile`: use the notify-exact layout, in which the supervisor also decides running-list "
        "syscalls that booting or shutdown lack, so each phase allows exactly its own list. Costs one "
        "notification per such syscall in the running phase (see docs/enforcement.md).",
    )
    seccomp_json: str = option(
        "",
        help="With `profile`: write the Docker seccomp profile that the container must start with here during "
        "setup, for the container launch to use. The notify back end writes its layout with this supervisor's "
        'socket as listenerPath; backend "kmod" writes the union of the phases. Empty writes nothing.',
    )
    default_action: Literal["kill-process", "errno"] = option(
        "kill-process",
        help="Action for syscalls that no phase lists, in `seccomp_json` and in the kmod back end's phase programs.",
    )
    errno: str = option("EPERM", help='With default_action "errno": the errno that unlisted syscalls return.')
    running_margin: Duration = option(
        Duration.parse("500ms"),
        help="Time after the phase machine's switch to running during which both the booting and the running "
        "lists are allowed, so that the last booting syscalls after the readiness signal still run.",
    )
    shutdown_grace: Duration = option(
        Duration.parse("2s"),
        help="Maximum time a running-phase syscall that only shutdown allows waits for the stop event "
        "before it is denied. The application sees SIGTERM before SPEAKER sees Docker's kill event.",
    )
    running_grace: Duration = option(
        Duration.parse("2s"),
        help="Maximum time a booting-phase syscall that only running allows waits for the switch to "
        "running, such as the first accept of a client faster than the readiness detector. Only the "
        "exact layout has such syscalls.",
    )
    response_timeout: Duration = option(
        Duration.parse("1s"),
        help="Maximum time a notification may wait for the supervisor. After it, the watchdog process "
        "denies it (allows it in complain mode) and logs the incident.",
    )
    max_listeners: int = option(
        1024, min=1, max=65536, help="Maximum listener fds (containers plus docker exec processes) at one time."
    )
    receive: Literal["auto", "poll"] = option(
        "auto",
        help='"auto" blocks in the receive ioctl on Linux 6.6+ (fastest) and polls elsewhere; "poll" always polls.',
    )


def check_supervisor_options(options: SupervisorOptions) -> None:
    """Raise OptionError for option values that contradict each other."""
    try:
        parse_errno(options.errno)
    except ValueError as exc:
        raise OptionError(str(exc), "errno") from None
    if options.seccomp_json and not options.profile:
        raise OptionError("seccomp_json needs `profile`: the Docker profile is written from its lists", "seccomp_json")
    if options.exact and not options.profile:
        raise OptionError(
            "exact applies to `profile`; with CompiledFilter events the layout comes from filter_compile",
            "exact",
        )


class NotifySupervisor:
    """Respond to seccomp notifications by the container's current phase, and emit a Violation for each denial.

    The kernel allows the running list. Syscalls that only booting or
    shutdown allow reach the supervisor, which lets them run while the
    container is in a phase that lists them. ``name`` is the stage's name in
    the pipeline, for messages that name its options.
    """

    def __init__(self, name: str, options: SupervisorOptions, log: Any) -> None:
        self.name = name
        self.options = options
        self.log = log

    async def setup(self) -> None:
        options = self.options
        try:
            check_kernel_layout()
        except OSError as exc:
            raise ComponentError(f"seccomp user notification is unusable on this kernel: {exc.strerror}") from exc
        settings = AgentSettings(
            socket_path=options.socket,
            mode=options.mode,
            deny_action=options.deny_action,
            shutdown_grace=float(options.shutdown_grace),
            running_grace=float(options.running_grace),
            response_timeout=float(options.response_timeout),
            max_listeners=options.max_listeners,
            blocking_receive=options.receive == "auto",
        )
        self.agent = NotifyAgent(settings, self.log)
        if options.profile:
            policy = await anyio.to_thread.run_sync(self._load_profile)
            self.agent.set_policy(policy)
        await self._log_delivery()
        try:
            self.agent.start()
        except OSError as exc:
            raise ComponentError(f"cannot listen on {options.socket}: {exc}") from exc
        self._pending_running: dict[str, anyio.CancelScope] = {}
        self._started = True

    async def _log_delivery(self) -> None:
        try:
            async with aiodocker.Docker() as docker:
                version = await docker.version()
                info = await docker.system.info()
        except (aiodocker.DockerError, OSError) as exc:
            self.log.warning("docker_version_unknown", error=str(exc), note="cannot tell how runc finds the socket")
            return
        delivery = choose_delivery(version, info)
        self.log.info(
            "listener_delivery",
            docker_version=delivery.docker_version,
            path=delivery.path,
            wrapper_runtimes=list(delivery.wrapper_runtimes),
        )
        if delivery.needs_wrapper and not delivery.wrapper_runtimes:
            self.log.warning(
                "runtime_wrapper_missing",
                docker_version=delivery.docker_version,
                fix=f"run `python -m speaker install-runtime` and start containers with --runtime {DEFAULT_RUNTIME_NAME}",
            )

    async def run(self, input: Input, output: Output) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._forward_violations, output)
            group.start_soon(self._watch_watchdog)
            self._group = group
            async for batch in input:
                for event in batch:
                    self._handle(event)
            group.cancel_scope.cancel()
        await anyio.to_thread.run_sync(self.agent.stop)
        await output.send_many(self.agent.take_violations())
        await output.flush()

    def _handle(self, event: Event) -> None:
        if isinstance(event, PhaseChange):
            self._change_phase(event)
        elif isinstance(event, CompiledFilter):
            self._use_filter(event)
        elif isinstance(event, ContainerEvent) and event.action is ContainerAction.DESTROY:
            self._cancel_pending(event.container_id)
            self.agent.forget(event.container_id)

    def _change_phase(self, event: PhaseChange) -> None:
        self._cancel_pending(event.container_id)
        margin = float(self.options.running_margin)
        if event.phase is Phase.RUNNING and margin > 0:
            # During the margin the container may use both lists: booting
            # syscalls just after the readiness signal, and running ones
            # (which only the exact layout keeps out of booting).
            self.agent.set_phase(event.container_id, Phase.BOOTING, also=Phase.RUNNING)
            self.log.info(
                "running_margin_started",
                container=event.container_id[:12],
                margin=str(self.options.running_margin),
                allowed="booting and running lists",
            )
            scope = anyio.CancelScope()
            self._pending_running[event.container_id] = scope
            self._group.start_soon(self._apply_later, scope, event, margin)
            return
        self._apply(event)

    async def _apply_later(self, scope: anyio.CancelScope, event: PhaseChange, delay: float) -> None:
        with scope:
            await anyio.sleep(delay)
            self._pending_running.pop(event.container_id, None)
            self._apply(event)

    def _cancel_pending(self, container_id: str) -> None:
        scope = self._pending_running.pop(container_id, None)
        if scope is not None:
            scope.cancel()

    def _apply(self, event: PhaseChange) -> None:
        if self.agent.set_phase(event.container_id, event.phase):
            self.log.info(
                "phase_enforced",
                container=event.container_id[:12],
                phase=event.phase.value,
                previous=event.previous.value if event.previous else None,
                detector=event.detector,
                reason=event.reason,
            )

    def _use_filter(self, event: CompiledFilter) -> None:
        if event.layout not in NOTIFY_LAYOUTS:
            self.log.info("compiled_filter_ignored", layout=event.layout, container=event.container_id[:12] or None)
            return
        # The runtime-init rule needs every execve notified, which a filter
        # from filter_compile does not promise.
        execve_in_kernel = sorted(set(EXEC_SYSCALLS) & event.allowed)
        policy = PhasePolicy.for_arches(
            event.phase_lists, event.arches, exact=event.layout == "notify-exact", runtime_rule=not execve_in_kernel
        )
        if execve_in_kernel:
            # TODO: with such a filter, runc's setup syscalls in a docker exec during running are judged by the
            # running list, so that exec fails unless the trace saw one.
            self.log.warning(
                "runtime_rule_off",
                container=event.container_id[:12] or "all",
                reason=f"the filter allows {', '.join(execve_in_kernel)} in the kernel, so the supervisor cannot "
                "tell the runtime's init from the program it executes",
            )
        self.agent.set_policy(policy, event.container_id)
        self.log.info(
            "policy_loaded",
            container=event.container_id[:12] or "all",
            layout=event.layout,
            arches=list(event.arches),
            notified=len(event.notified),
        )

    async def _forward_violations(self, output: Output) -> None:
        while True:
            await anyio.wait_readable(self.agent.violations_ready)
            await output.send_many(self.agent.take_violations())

    async def _watch_watchdog(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self.agent.check_watchdog()
            if not self.agent.watchdog.alive:
                self.log.error(
                    "watchdog_died",
                    exit_code=self.agent.watchdog.process.returncode if self.agent.watchdog.process else None,
                    note="from now on, nothing responds to notifications a stalled supervisor leaves waiting",
                )
                return

    async def teardown(self) -> None:
        if getattr(self, "_started", False):
            await anyio.to_thread.run_sync(self.agent.close)
            if self.agent.dropped_violations:
                self.log.warning("violations_dropped", count=self.agent.dropped_violations)

    def _load_profile(self) -> PhasePolicy:
        options = self.options
        path = Path(options.profile)
        settings = compile_settings(options.default_action, options.errno)
        filled_lists = load_enforced_lists(path, self.name, self.log)
        try:
            plan = adapt_plan(notify_plan(filled_lists, settings, exact=options.exact), self.log)
            policy = PhasePolicy(arch_phase_lists(filled_lists, settings), exact=options.exact)
        except (UnknownSyscall, EmptyPhase, ValueError) as exc:
            raise ComponentError(f"cannot use the profile {path}: {exc}") from exc
        self.log.info(
            "policy_loaded",
            profile=str(path),
            layout=plan.layout.value,
            kernel_allowed=len(plan.allowed),
            notified=len(plan.notified),
        )
        if options.seccomp_json:
            write_seccomp_json(
                plan, Path(options.seccomp_json), self.log, listener_path=str(options.socket), listener_metadata="speaker-supervisor"
            )
        return policy


#: Syscalls that runc 1.1 refuses to load with SCMP_ACT_NOTIFY ("SCMP_ACT_NOTIFY
#: cannot be used for the write syscall"), because it writes to its sync pipe
#: after loading the filter.
NEVER_NOTIFIED = ("write",)


def adapt_plan(plan: FilterPlan, log: Any) -> FilterPlan:
    """Return ``plan`` with the changes the supervisor needs from the kernel filter.

    NEVER_NOTIFIED syscalls are allowed in the kernel instead of notified, so
    they run in every phase, which is wider than their lists. EXEC_SYSCALLS
    are notified instead of allowed in the kernel, so that the supervisor
    receives the runtime init's execve (NotifyAgent.is_runtime_init) and decides
    every later execve by phase. An execve costs far more than a notification.
    """
    to_allow = {name for name in NEVER_NOTIFIED if name in plan.notified}
    to_notify = {name for name in EXEC_SYSCALLS if name in plan.allowed}
    if not to_allow and not to_notify:
        return plan
    rules = {}
    for arch, by_name in plan.rules.items():
        rules[arch] = dict(by_name)
        for name, action in by_name.items():
            if name in to_allow and action == NOTIFY:
                rules[arch][name] = ALLOW
            elif name in to_notify and action == ALLOW:
                rules[arch][name] = NOTIFY
    if to_allow:
        log.warning(
            "syscalls_allowed_in_every_phase",
            syscalls=sorted(to_allow),
            reason="runc rejects SCMP_ACT_NOTIFY for them, so the kernel allows them in every phase",
        )
    if to_notify:
        log.info("syscalls_always_notified", syscalls=sorted(to_notify), reason="the supervisor tracks the runtime's execve")
    return dataclasses.replace(plan, rules=rules)
