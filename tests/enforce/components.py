"""Components for the enforcement tests, loaded by import path from pipeline files."""

from __future__ import annotations

from speaker.component import Output, Source
from speaker.events import Phase, Violation

VIOLATIONS = [
    Violation(container_id="c1", phase=Phase.RUNNING, pid=10, comm="perl", syscall="mount", arch="x86_64", action="denied", nr=165),
    Violation(container_id="c1", phase=Phase.RUNNING, pid=10, comm="perl", syscall="mount", arch="x86_64", action="denied", nr=165),
    Violation(container_id="c1", phase=Phase.BOOTING, pid=11, comm="sh", syscall="chroot", arch="x86_64", action="denied", nr=161),
]  # fmt: skip


class FixedViolations(Source):
    """Emit VIOLATIONS and end."""

    type_name = "fixed_violations"
    emits = (Violation,)

    async def run(self, output: Output) -> None:
        await output.send_many(VIOLATIONS)
