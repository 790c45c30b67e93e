"""The ``any`` and ``all`` combinators, which join several detectors into one."""

from __future__ import annotations

from collections.abc import Sequence

from speaker.detectors.base import Detector, Readiness
from speaker.events import Event


class _Combinator(Detector):
    def __init__(self, children: Sequence[Detector], started_at: float) -> None:
        super().__init__(None, started_at)
        self.children = list(children)
        # The union of the children's types, so that a combinator nested in
        # another one receives what its children read.
        self.accepts = tuple(dict.fromkeys(cls for child in self.children for cls in child.accepts))
        #: Readiness of each child that has fired, by index.
        self.fired: dict[int, Readiness] = {}

    def observe(self, event: Event) -> Readiness | None:
        for index, child in enumerate(self.children):
            if index not in self.fired and isinstance(event, child.accepts):
                self._note(index, child.observe(event))
        return self._decide()

    def advance(self, now: float) -> Readiness | None:
        for index, child in enumerate(self.children):
            if index not in self.fired:
                self._note(index, child.advance(now))
        return self._decide()

    def _note(self, index: int, readiness: Readiness | None) -> None:
        if readiness is not None:
            self.fired[index] = readiness

    def _decide(self) -> Readiness | None:
        raise NotImplementedError


class AnyOf(_Combinator):
    """Fire as soon as one child fires, with that child's time, name and reason."""

    type_name = "any"

    def _decide(self) -> Readiness | None:
        if not self.fired:
            return None
        return min(self.fired.values(), key=lambda readiness: readiness.time)


class AllOf(_Combinator):
    """Fire once every child has fired, at the latest of their times.

    Each child needs to fire once; they need not be ready at the same moment.
    """

    type_name = "all"

    def _decide(self) -> Readiness | None:
        if len(self.fired) < len(self.children):
            return None
        ordered = [self.fired[index] for index in range(len(self.children))]
        latest = max(ordered, key=lambda readiness: readiness.time)
        reason = "; ".join(readiness.reason for readiness in ordered)
        return Readiness(latest.time, latest.detector, reason)
