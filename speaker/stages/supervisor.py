"""Enforce each container's phase lists by responding to its seccomp user notifications."""

from __future__ import annotations

from speaker.component import Input, Output, Stage
from speaker.events import CompiledFilter, ContainerEvent, PhaseChange, Violation
from speaker.notify.supervisor import NotifySupervisor, SupervisorOptions, check_supervisor_options


class Supervisor(Stage):
    """Respond to seccomp notifications by the container's current phase, and emit a Violation for each denial.

    The kernel allows the running list. Syscalls that only booting or
    shutdown allow reach this stage, which lets them run while the container
    is in a phase that lists them. The ``enforce`` stage does the same with
    ``backend = "notify"``. docs/enforcement.md has the details.
    """

    type_name = "supervisor"
    Options = SupervisorOptions
    accepts = (PhaseChange, ContainerEvent, CompiledFilter)
    emits = (Violation,)

    @classmethod
    def check_options(cls, options: SupervisorOptions) -> None:
        check_supervisor_options(options)

    async def setup(self) -> None:
        self._supervisor = NotifySupervisor(self.name, self.options, self.log)
        await self._supervisor.setup()

    async def run(self, input: Input, output: Output) -> None:
        await self._supervisor.run(input, output)

    async def teardown(self) -> None:
        supervisor = getattr(self, "_supervisor", None)
        if supervisor is not None:
            await supervisor.teardown()
