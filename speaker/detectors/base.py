"""The detector interface: when has a container finished booting?

A detector watches the events of one container and reports a ``Readiness``
the first time it decides that the container is ready. It does not depend on
tracing or enforcement: the ``phase_machine`` stage feeds it recorded or live
events, and an enforcing supervisor can feed it live events the same way.

The caller makes one detector per container with ``DetectorSpec.create`` and
then, in any order:

* ``observe(event)`` for each event of that container whose type is in the
  detector's ``accepts``;
* ``advance(now)`` whenever time passes. ``now`` is a wall-clock time (seconds
  since the epoch) up to which the caller has passed on every event, so a
  detector may treat the interval before it as complete.

Both return a ``Readiness`` once and None otherwise. After a detector has
fired, the caller need not call it again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from speaker.component import NoOptions
from speaker.events import Event
from speaker.options import format_value, option_specs


@dataclasses.dataclass(frozen=True)
class Readiness:
    """A detector's decision that a container is ready."""

    #: Wall-clock time (seconds since the epoch) at which the container was
    #: first seen ready. Records before it belong to booting.
    time: float
    #: Type name of the detector that decided, such as ``listen``.
    detector: str
    #: One sentence for people, such as "TCP port 6379 is in LISTEN".
    reason: str


class Detector:
    """Base of readiness detectors.

    Subclasses set ``type_name`` (the ``type`` in pipeline files), ``Options``
    (a dataclass made with ``speaker.options.option``, validated like component
    options), ``accepts``, and override ``observe`` and/or ``advance``.
    """

    type_name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Event types that ``observe`` reads.
    accepts: ClassVar[tuple[type[Event], ...]] = ()

    def __init__(self, options: Any, started_at: float) -> None:
        self.options = options
        #: Wall-clock time at which the container started.
        self.started_at = started_at

    @classmethod
    def check_options(cls, options: Any) -> None:
        """Raise speaker.options.OptionError for values that are valid types but invalid together."""

    def observe(self, event: Event) -> Readiness | None:
        """Read one event of the container. Return a Readiness the first time it is ready."""
        return None

    def advance(self, now: float) -> Readiness | None:
        """Note that every event before wall-clock time ``now`` has been observed."""
        return None


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """A validated detector description, from which one detector per container is made."""

    cls: type[Detector]
    options: Any
    children: tuple[DetectorSpec, ...] = ()

    @property
    def type_name(self) -> str:
        return self.cls.type_name

    def accepts(self) -> tuple[type[Event], ...]:
        """Return every event type that this detector or one of its children reads."""
        found: list[type[Event]] = list(self.cls.accepts)
        for child in self.children:
            found.extend(cls for cls in child.accepts() if cls not in found)
        return tuple(found)

    def create(self, started_at: float) -> Detector:
        """Make a fresh detector for a container that started at ``started_at`` (wall clock)."""
        if self.children:
            return self.cls([child.create(started_at) for child in self.children], started_at)
        return self.cls(self.options, started_at)

    def describe(self) -> str:
        """Return a short form for messages, such as ``any(listen(port=6379), delay(after="30s"))``."""
        if self.children:
            return f"{self.type_name}({', '.join(child.describe() for child in self.children)})"
        values = []
        for spec in option_specs(self.cls.Options):
            value = getattr(self.options, spec.name)
            if spec.required or value != spec.default:
                values.append(f"{spec.name}={format_value(value)}")
        return f"{self.type_name}({', '.join(values)})"
