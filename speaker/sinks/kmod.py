"""Enforce phases through the SPEAKER kernel module (/dev/speaker)."""

from __future__ import annotations

from speaker.component import Sink
from speaker.events import CompiledFilter, ContainerEvent, Event, PhaseChange
from speaker.kmod_driver import KmodDriver, KmodOptions


class Kmod(Sink):
    """Enforce one seccomp program per phase by swapping it in the kernel, for every task of a container at once.

    Needs the kernel module (docs/kmod.md) and root. A container must start
    with a seccomp profile, such as the union filter, because the module swaps
    programs inside that filter. The sink registers the container's init
    process on the ``start`` event, loads the ``phase`` layout filters of
    filter_compile, and switches on each PhaseChange. Filters of other
    layouts are ignored. The ``enforce`` stage with ``backend = "kmod"`` does
    the same from a profile file, without filter_compile.
    """

    type_name = "kmod"
    Options = KmodOptions
    accepts = (ContainerEvent, CompiledFilter, PhaseChange)

    async def setup(self) -> None:
        self._driver = KmodDriver(self.options, self.log, self.context)
        self._driver.open()
        self._ignored_layouts: set[str] = set()

    async def write(self, event: Event) -> None:
        if isinstance(event, ContainerEvent):
            await self._driver.container_event(event)
        elif isinstance(event, CompiledFilter):
            self._compiled_filter(event)
        elif isinstance(event, PhaseChange):
            self._driver.set_phase(event.container_id, event.phase)

    def _compiled_filter(self, event: CompiledFilter) -> None:
        if event.layout != "phase" or event.phase is None:
            if event.layout not in self._ignored_layouts:
                self._ignored_layouts.add(event.layout)
                self.log.info("filter_layout_ignored", layout=event.layout, reason="the kmod back end loads phase filters")
            return
        self._driver.set_program(event.container_id, event.phase, event.bpf)

    async def teardown(self) -> None:
        driver = getattr(self, "_driver", None)
        if driver is not None:
            await driver.close()
