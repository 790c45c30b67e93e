"""Ready when a TCP port is in LISTEN inside the container."""

from __future__ import annotations

import dataclasses

from speaker.detectors.base import Detector, Readiness
from speaker.events import Event, ProcessSample
from speaker.options import option


@dataclasses.dataclass(frozen=True)
class ListenOptions:
    port: int = option(0, min=0, max=65535, help="TCP port to wait for; 0 accepts any port.")


class Listen(Detector):
    """Fire at the first process sample that shows the port in LISTEN in the container's network namespace."""

    type_name = "listen"
    Options = ListenOptions
    accepts = (ProcessSample,)

    def observe(self, event: Event) -> Readiness | None:
        if not isinstance(event, ProcessSample) or not event.listening_ports:
            return None
        port = self.options.port
        if port == 0:
            reason = f"TCP port {min(event.listening_ports)} is in LISTEN"
        elif port in event.listening_ports:
            reason = f"TCP port {port} is in LISTEN"
        else:
            return None
        return Readiness(event.wall_time, self.type_name, reason)
