"""Ready when a line of the container's output matches a regular expression."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from speaker.detectors.base import Detector, Readiness
from speaker.events import ContainerOutput, Event
from speaker.options import OptionError, option


@dataclasses.dataclass(frozen=True)
class LogOptions:
    pattern: str = option(
        help="Python regular expression searched in each output line, such as 'Ready to accept connections'."
    )
    stream: Literal["any", "stdout", "stderr"] = option("any", help="Output stream whose lines are searched.")


class Log(Detector):
    """Fire at the first stdout or stderr line of the container that the pattern matches."""

    type_name = "log"
    Options = LogOptions
    accepts = (ContainerOutput,)

    def __init__(self, options: LogOptions, started_at: float) -> None:
        super().__init__(options, started_at)
        self._pattern = re.compile(options.pattern)

    @classmethod
    def check_options(cls, options: LogOptions) -> None:
        try:
            re.compile(options.pattern)
        except re.error as exc:
            raise OptionError(f"invalid regular expression {options.pattern!r}: {exc}", "pattern") from None

    def observe(self, event: Event) -> Readiness | None:
        if not isinstance(event, ContainerOutput):
            return None
        if self.options.stream != "any" and event.stream != self.options.stream:
            return None
        if self._pattern.search(event.line) is None:
            return None
        return Readiness(event.wall_time, self.type_name, f"{event.stream} line matched {self.options.pattern!r}")
