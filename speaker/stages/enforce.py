"""Enforce each container's phase lists with the back end that the ``backend`` option selects."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from speaker.component import Input, Output, Stage
from speaker.enforce_profile import compile_settings
from speaker.events import CompiledFilter, ContainerEvent, PhaseChange, Violation
from speaker.kmod_backend import DENY_ACTIONS, KmodBackend, KmodSettings
from speaker.kmod_driver import KmodOptions
from speaker.notify.supervisor import NotifySupervisor, SupervisorOptions, check_supervisor_options
from speaker.options import OptionError, option, option_specs

#: Reasons, by option name, that the notify-only options have no meaning with the kmod back end.
NOTIFY_ONLY = {
    "mode": "the kmod back end has no complain mode: the kernel applies each phase's program and reports nothing, "
    "so run the notify back end in complain mode, or trace again",
    "exact": "the kmod back end always enforces each phase's own list, and exact only selects the notify-exact layout",
    "shutdown_grace": "with kmod, kernel_shutdown switches to shutdown in the kernel when the stop signal is sent, "
    "so no syscall waits for Docker's kill event",
    "running_grace": "only the notify-exact layout holds syscalls until the switch to running",
    "socket": "the kmod back end runs no supervisor, so no runtime connects to a socket",
    "response_timeout": "the kmod back end runs no supervisor, so no notification waits for one",
    "max_listeners": "the kmod back end receives no listener fds",
    "receive": "the kmod back end receives no notifications",
}


@dataclasses.dataclass(frozen=True)
class BackendOption:
    backend: Literal["notify", "kmod"] = option(
        "notify",
        help='Enforcement back end. "notify": seccomp user notification and the SPEAKER supervisor, no kernel '
        'module needed, reports violations (docs/enforcement.md). "kmod": the SPEAKER kernel module swaps one '
        "program per phase in the kernel; needs `profile`, has no complain mode and reports nothing (docs/kmod.md).",
    )


@dataclasses.dataclass(frozen=True)
class EnforceOptions(KmodOptions, SupervisorOptions, BackendOption):
    """The options of both back ends. A dataclass lists the fields of its last base first, so ``backend`` leads."""


#: Options of the kmod back end alone, from KmodOptions.
KMOD_ONLY = tuple(spec.name for spec in option_specs(KmodOptions))


class Enforce(Stage):
    """Enforce each container's booting, running and shutdown lists, through seccomp notification or the kernel module.

    ``backend = "notify"`` works as the ``supervisor`` stage and emits a
    Violation for each denial. ``backend = "kmod"`` compiles the profile's
    phase programs, registers each container's init process with the kernel
    module on its start event, and switches programs on each PhaseChange, as
    the ``kmod`` sink does. ``check_options`` rejects an option that the
    chosen back end would ignore.
    """

    type_name = "enforce"
    Options = EnforceOptions
    accepts = (PhaseChange, ContainerEvent, CompiledFilter)
    emits = (Violation,)

    @classmethod
    def check_options(cls, options: EnforceOptions) -> None:
        check_supervisor_options(options)
        defaults = {spec.name: spec.default for spec in option_specs(EnforceOptions)}
        if options.backend == "kmod":
            if not options.profile:
                raise OptionError(
                    'backend "kmod" needs `profile`: the stage compiles the phase programs from it. To load '
                    "filter_compile's programs instead, use the kmod sink",
                    "profile",
                )
            for name, reason in NOTIFY_ONLY.items():
                if getattr(options, name) != defaults[name]:
                    raise OptionError(f'{name} applies to backend "notify" only: {reason}', name)
        else:
            for name in KMOD_ONLY:
                if getattr(options, name) != defaults[name]:
                    raise OptionError(f'{name} applies to backend "kmod" only; set backend = "kmod" to use it', name)

    async def setup(self) -> None:
        options = self.options
        self._backend: NotifySupervisor | KmodBackend
        if options.backend == "kmod":
            self._backend = KmodBackend(self.name, kmod_settings(options), options, self.log, self.context)
        else:
            self._backend = NotifySupervisor(self.name, options, self.log)
        self.log.info("enforce_backend", backend=options.backend)
        await self._backend.setup()

    async def run(self, input: Input, output: Output) -> None:
        await self._backend.run(input, output)

    async def teardown(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            await backend.teardown()


def kmod_settings(options: EnforceOptions) -> KmodSettings:
    """Return the kmod back end's settings from the enforce stage's options."""
    return KmodSettings(
        profile=Path(options.profile),
        seccomp_json=Path(options.seccomp_json) if options.seccomp_json else None,
        compile=compile_settings(options.default_action, options.errno),
        deny=DENY_ACTIONS[options.deny_action],
        running_margin=float(options.running_margin),
    )
