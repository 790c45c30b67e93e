"""Ready when Docker reports the container healthy."""

from __future__ import annotations

from speaker.detectors.base import Detector, Readiness
from speaker.events import ContainerAction, ContainerEvent, Event


class Health(Detector):
    """Fire on Docker's first ``health_status: healthy`` event.

    The container needs a health check (``HEALTHCHECK`` in the image or
    ``--health-cmd`` on ``docker run``); without one, Docker never reports
    health and the detector never fires.
    """

    type_name = "health"
    accepts = (ContainerEvent,)

    def observe(self, event: Event) -> Readiness | None:
        if not isinstance(event, ContainerEvent):
            return None
        if event.action != ContainerAction.HEALTH_STATUS or event.health != "healthy":
            return None
        return Readiness(event.event_time or event.wall_time, self.type_name, "Docker reports the container healthy")
