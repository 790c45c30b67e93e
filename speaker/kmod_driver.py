"""Drive the SPEAKER kernel module for a pipeline: register containers, load their phase programs, switch phases.

Both the ``kmod`` sink (programs from filter_compile's CompiledFilter events)
and the ``enforce`` stage with ``backend = "kmod"`` (programs it compiles
itself) use ``KmodDriver``. The driver keeps, per container, the phase the
pipeline announced and the programs it was given, so the order in which the
start event, the programs and the phase changes arrive does not matter.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any, Literal

import anyio

from speaker.engine import ExitCode, PipelineContext
from speaker.errors import ComponentError
from speaker.events import ContainerAction, ContainerEvent, Phase
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
    """A container that the driver registered with the module."""

    group: int
    pid: int
    phase: Phase | None = None
    loaded: set[Phase] = dataclasses.field(default_factory=set)


class KmodDriver:
    """The pipeline's view of /dev/speaker: one registration per container, one program per phase.

    Failed ioctls are logged and reported as pipeline problems (exit code 1)
    instead of raised, so that one container's failure does not stop the
    enforcement of the others.
    """

    def __init__(self, options: KmodOptions, log: Any, context: PipelineContext) -> None:
        self.options = options
        self.log = log
        self.context = context
        self._device: KmodDevice | None = None
        self._containers: dict[str, _Container] = {}
        # Phase programs by container id. The key "" is for programs that apply to every container.
        self._programs: dict[str, dict[Phase, bytes]] = {}
        # The latest phase the pipeline announced per container, also before registration.
        self._phases: dict[str, Phase] = {}

    @property
    def device(self) -> KmodDevice:
        assert self._device is not None, "KmodDriver.open() must run first"
        return self._device

    def open(self) -> None:
        """Open the device and read the module's ABI version. Raises ComponentError with the fix."""
        try:
            self._device = KmodDevice(self.options.device)
            info = self._device.version()
        except KmodError as exc:
            raise ComponentError(exc.strerror or str(exc)) from exc
        self.log.info("kmod_ready", device=str(self.options.device), abi=info.abi_version, groups=info.groups)

    async def container_event(self, event: ContainerEvent) -> None:
        """Register a container on ``start``, and unregister it on ``die`` or ``destroy``."""
        if event.action is ContainerAction.START and event.pid > 0 and event.container_id not in self._containers:
            await self._register(event)
        elif event.action in (ContainerAction.DIE, ContainerAction.DESTROY):
            container = self._containers.pop(event.container_id, None)
            self._phases.pop(event.container_id, None)
            self._programs.pop(event.container_id, None)
            if container is not None:
                await self._unregister(event.container_id, container, restore=False)

    def set_phase(self, container_id: str, phase: Phase) -> None:
        """Put ``phase`` in force for a registered container, or remember it for when the container registers."""
        self._phases[container_id] = phase
        container = self._containers.get(container_id)
        if container is not None:
            self._switch(container_id, container, phase)

    def set_program(self, container_id: str, phase: Phase, bpf: bytes) -> None:
        """Give ``phase`` a program for one container, or for every container when ``container_id`` is empty.

        A program for one container takes precedence over one for every
        container. A program for the phase in force takes effect at once.
        """
        self._programs.setdefault(container_id, {})[phase] = bpf
        for registered_id, container in self._containers.items():
            if container_id in ("", registered_id):
                if container_id == "" and phase in self._programs.get(registered_id, {}):
                    continue
                self._load(registered_id, container, phase, bpf)

    async def _register(self, event: ContainerEvent) -> None:
        stop_signal = 0
        if self.options.kernel_shutdown:
            stop_signal = event.stop_signal or int(signal.SIGTERM)
        try:
            group = await anyio.to_thread.run_sync(
                lambda: self.device.register(event.pid, stop_signal, newest=self.options.newest_filter, adopt=True)
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

    def _load(self, container_id: str, container: _Container, phase: Phase, bpf: bytes) -> None:
        try:
            self.device.load(container.group, phase, bpf)
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
            self.device.switch(container.group, phase)
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
            await anyio.to_thread.run_sync(lambda: self.device.unregister(container.group, restore=restore))
        except KmodError as exc:
            self._fail(container_id, "unregister", exc)
            return
        self.log.info("container_unregistered", container=container_id[:12], group=container.group, restored=restore)

    def _fail(self, container_id: str, action: str, exc: KmodError) -> None:
        self.log.error("kmod_failed", container=container_id[:12], action=action, error=str(exc))
        self.context.report_problem(ExitCode.FAILED, f"container {container_id[:12]}: cannot {action}: {exc}")

    async def close(self) -> None:
        """Unregister or keep the containers still registered, as the ``on_exit`` option sets, then close the device."""
        device = self._device
        if device is None:
            return
        if self.options.on_exit != "stay":
            for container_id, container in list(self._containers.items()):
                await self._unregister(container_id, container, restore=self.options.on_exit == "restore")
        elif self._containers:
            self.log.info("containers_stay_registered", containers=len(self._containers))
        device.close()
        self._device = None
