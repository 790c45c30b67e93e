"""Ready a fixed time after the container started."""

from __future__ import annotations

import dataclasses

from speaker.detectors.base import Detector, Readiness
from speaker.options import Duration, option


@dataclasses.dataclass(frozen=True)
class DelayOptions:
    after: Duration = option(help='Time after the container started at which it counts as ready, such as "30s".')


class Delay(Detector):
    """Fire ``after`` seconds after the container started, whatever it does."""

    type_name = "delay"
    Options = DelayOptions

    def advance(self, now: float) -> Readiness | None:
        ready_at = self.started_at + self.options.after
        if now < ready_at:
            return None
        return Readiness(ready_at, self.type_name, f"{self.options.after} passed since the container started")
