"""Enforce phases through the SPEAKER kernel module (/dev/speaker)."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Literal

import anyio

from speaker.component import Sink
from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import CompiledFilter, ContainerAction, ContainerEvent, Event, Phase, PhaseChange
from speaker.kmod_io import KmodDevice, KmodError, StopSignalSeen
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class KmodOptions:
    device: Path = option(Path("/dev/speaker"), help="Device node of the SPEAKER kernel module.")
    kernel_shutdown: bool = option(
        True,
        help="Switch a container to its shutdown program in the kernel when its stop signal (the container's "
        "StopSignal, SIGTERM by default) is sent to its init process, before the application's handler runs.",
    )
    on_exit: Literal["stay", "keep", "restore"] = option(
        "stay",
        help='Handling of containers still running when the pipeline stops. "stay" leaves them registered, so the '
        'kernel still switches them to shutdown on their stop signal and a restarted pipeline adopts them. "keep" '
        'unregisters them with their current program in force. "restore" unregisters them and puts back the '
        "program the container runtime installed.",
    )
    newest_filter: bool = option(
        False,
        help="Register the newest seccomp filter of the container's init process instead of the one the "
        "runtime installed (the oldest one it did not inherit).",
    )


@dataclasses.dataclass
class _Container:
    """A container that the sink registered with the module."""

    group: int
    pid: int
    phase: Phase | None = None
    loaded: set[Phase] = dataclasses.field(default_factory=set)


class Kmod(Sink):
    """Enforce one seccomp program per phase by swapping it in the kernel, for every task of a container at once.

    Needs the kernel module (docs/kmod.md) and root. A container must start
    with a seccomp profile, such as the union filter, because the module swaps
    programs inside that filter. The sink registers the container's init
    process on the ``start`` event, loads the ``phase`` layout filters of
    filter_compile, and switches on each PhaseChange. Filters of other
    layouts are ignored.
    """

    type_name = "kmod"
    Options = KmodOptions
    accepts = (ContainerEvent, CompiledFilter, PhaseChange)

    async def setup(self) -> None:
        try:
            self._device = KmodDevice(self.options.device)
            info = self._device.version()
        except KmodError as exc:
            raise ComponentError(str(exc)) from exc
        self.log.info("kmod_ready", device=str(self.options.device), abi=info.abi_version, groups=info.groups)
        self._containers: dict[str, _Container] = {}
        # Phase programs by container id. The key "" is for filters that apply to every container.
        self._programs: dict[str, dict[Phase, bytes]] = {}
        # The latest phase the pipeline announced per container, also before registration.
        self._phases: dict[str, Phase] = {}
        self._ignored_layouts: set[str] = set()

    async def write(self, event: Event) -> None:
        if isinstance(event, ContainerEvent):
            await self._container_event(event)
        elif isinstance(event, CompiledFilter):
            self._compiled_filter(event)
        elif isinstance(event, PhaseChange):
            self._phases[event.container_id] = event.phase
            container = self._containers.get(event.container_id)
            if container is not None:
                self._switch(event.container_id, container, event.phase)

    async def _container_event(self, event: ContainerEvent) -> None:
        if event.action is ContainerAction.START and event.pid > 0 and event.container_id not in self._containers:
            await self._register(event)
        elif event.action in (ContainerAction.DIE, ContainerAction.DESTROY):
            container = self._containers.pop(event.container_id, None)
            self._phases.pop(event.container_id, None)
            self._programs.pop(event.container_id, None)
            if container is not None:
                await self._unregister(event.container_id, container, restore=False)

    async def _register(self, event: ContainerEvent) -> None:
        stop_signal = 0
        if self.options.kernel_shutdown:
            stop_signal = event.stop_signal or int(signal.SIGTERM)
        try:
            group = await anyio.to_thread.run_sync(
                lambda: self._device.register(
                    event.pid, stop_signal, newest=self.options.newest_filter, adopt=True
                )
            )
        except KmodError as exc:
            self._fail(event.container_id, "register", exc)
            return
        container = _Container(group=group, pid=event.pid)
        self._containers[event.container_id] = container
        self.log.info(
            "container_registered", container=event.container_id[:12], pid=event.pid, group=group, stop_signal=stop_signal
        )
        for phase, bpf in self._programs_for(event.container_id).items():
            self._load(event.container_id, container, phase, bpf)
        # A container that just started is booting unless the pipeline announced another phase.
        phase = self._phases.get(event.container_id, Phase.BOOTING)
        if phase in container.loaded:
            self._switch(event.container_id, container, phase)

    def _programs_for(self, container_id: str) -> dict[Phase, bytes]:
        programs = dict(self._programs.get("", {}))
        programs.update(self._programs.get(container_id, {}))
        return programs

    def _compiled_filter(self, event: CompiledFilter) -> None:
        if event.layout != "phase" or event.phase is None:
            if event.layout not in self._ignored_layouts:
                self._ignored_layouts.add(event.layout)
                self.log.info("filter_layout_ignored", layout=event.layout, reason="the kmod back end loads phase filters")
            return
        self._programs.setdefault(event.container_id, {})[event.phase] = event.bpf
        for container_id, container in self._containers.items():
            if event.container_id in ("", container_id):
                if event.container_id == "" and event.phase in self._programs.get(container_id, {}):
                    continue
                self._load(container_id, container, event.phase, event.bpf)

    def _load(self, container_id: str, container: _Container, phase: Phase, bpf: bytes) -> None:
        try:
            self._device.load(container.group, phase, bpf)
        except KmodError as exc:
            self._fail(container_id, f"load the {phase} program", exc)
            return
        container.loaded.add(phase)
        self.log.info("program_loaded", container=container_id[:12], phase=str(phase), instructions=len(bpf) // 8)
        # Until the pipeline names a phase, a container that has not been switched yet is booting.
        expected = self._phases.get(container_id) or (Phase.BOOTING if container.phase is None else None)
        if expected == phase and container.phase != phase:
            self._switch(container_id, container, phase)

    def _switch(self, container_id: str, container: _Container, phase: Phase) -> None:
        if container.phase == phase:
            return
        if phase not in container.loaded:
            self.log.warning(
                "phase_program_missing", container=container_id[:12], phase=str(phase), current=str(container.phase)
            )
            return
        try:
            self._device.switch(container.group, phase)
        except StopSignalSeen:
            self.log.info("shutdown_already_in_force", container=container_id[:12], phase=str(phase))
            container.phase = Phase.SHUTDOWN
            return
        except KmodError as exc:
            self._fail(container_id, f"switch to {phase}", exc)
            return
        container.phase = phase
        self.log.info("phase_switched", container=container_id[:12], phase=str(phase))

    async def _unregister(self, container_id: str, container: _Container, *, restore: bool) -> None:
        try:
            await anyio.to_thread.run_sync(lambda: self._device.unregister(container.group, restore=restore))
        except KmodError as exc:
            self._fail(container_id, "unregister", exc)
            return
        self.log.info("container_unregistered", container=container_id[:12], group=container.group, restored=restore)

    def _fail(self, container_id: str, action: str, exc: KmodError) -> None:
        self.log.error("kmod_failed", container=container_id[:12], action=action, error=str(exc))
        self.context.report_problem(ExitCode.FAILED, f"container {container_id[:12]}: cannot {action}: {exc}")

    async def teardown(self) -> None:
        device = getattr(self, "_device", None)
        if device is None:
            return
        if self.options.on_exit != "stay":
            for container_id, container in list(self._containers.items()):
                await self._unregister(container_id, container, restore=self.options.on_exit == "restore")
        elif self._containers:
            self.log.info("containers_stay_registered", containers=len(self._containers))
        device.close()
