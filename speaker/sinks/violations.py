"""Write enforcement violations as JSON lines and count them per phase."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from speaker.component import Batch, Input, Sink
from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import PHASES, Violation
from speaker.keep_earlier import check_output_file, keep_earlier_file
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class ViolationsOptions:
    path: str = option(
        "violations.jsonl",
        help='JSON lines file with one Violation per line, or "-" for standard output. Parent directories are '
        "created. A non-empty file from an earlier run is renamed after its modification time, such as "
        "violations.2026-12-04T23-59-01Z.jsonl, so the newest violations are always at path.",
    )
    summary: str = option(
        "",
        help="JSON file for the counts at exit (per container, phase and syscall); empty writes none. "
        "A summary from an earlier run is renamed like path.",
    )
    fail_on_violation: bool = option(
        False, help="Make the pipeline exit with code 4 when any violation was reported."
    )


class Violations(Sink):
    """Write each Violation as one JSON line, and log and optionally save the per-phase counts at exit."""

    type_name = "violations"
    Options = ViolationsOptions
    accepts = (Violation,)

    async def setup(self) -> None:
        # Files are opened and earlier ones moved aside only when the pipeline
        # runs, so a run that fails during setup leaves them where they were.
        self._file = None
        self.total = 0
        self.by_phase: collections.Counter[str] = collections.Counter()
        self.by_key: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        for option_name, what, path in self._output_files():
            check_output_file(path, what, option_name)

    def _output_files(self) -> list[tuple[str, str, Path]]:
        """Return the option name, description and path of each file this sink writes."""
        files = []
        if self.options.path != "-":
            files.append(("path", "violations file", Path(self.options.path)))
        if self.options.summary:
            files.append(("summary", "violations summary", Path(self.options.summary)))
        return files

    async def run(self, input: Input) -> None:
        for _, _, path in self._output_files():
            kept = keep_earlier_file(path)
            if kept is not None:
                self.log.info("violations_kept", path=str(path), moved_to=str(kept))
        if self.options.path != "-":
            path = Path(self.options.path)
            try:
                self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in teardown
            except OSError as exc:
                raise ComponentError(f"cannot open {path} for writing: {exc.strerror}") from exc
        await super().run(input)

    async def write_batch(self, batch: Batch) -> None:
        lines = []
        for event in batch:
            assert isinstance(event, Violation)
            self.total += 1
            self.by_phase[event.phase.value] += 1
            self.by_key[(event.container_id, event.phase.value, event.syscall, event.action)] += 1
            lines.append(json.dumps(event.to_dict(), separators=(",", ":")) + "\n")
        stream = self._file if self._file is not None else sys.stdout
        stream.write("".join(lines))
        # Violations are rare and each one matters: keep them on disk at once.
        stream.flush()

    async def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        counts = {phase.value: self.by_phase.get(phase.value, 0) for phase in PHASES}
        self.log.info("violations_summary", total=self.total, path=self.options.path, **counts)
        if self.options.summary:
            self._write_summary(Path(self.options.summary), counts)
        if self.total and self.options.fail_on_violation:
            self.context.report_problem(ExitCode.VIOLATIONS, f"{self.total} violations, listed in {self.options.path}")

    def _write_summary(self, path: Path, counts: dict[str, int]) -> None:
        entries: list[dict[str, Any]] = [
            {"container_id": container, "phase": phase, "syscall": syscall, "action": action, "count": count}
            for (container, phase, syscall, action), count in sorted(self.by_key.items())
        ]
        document = {"total": self.total, "phases": counts, "violations": entries}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            temporary.replace(path)
        except OSError as exc:
            raise ComponentError(f"cannot write the violations summary {path}: {exc.strerror}") from exc

    async def teardown(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
