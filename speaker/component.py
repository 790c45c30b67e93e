"""Base classes for pipeline components: Source, Stage and Sink.

A component is a class with a ``type_name``, an ``Options`` dataclass (see
``speaker.options.option``), the event types it ``accepts`` and ``emits``, and
one coroutine that does its work. The engine builds one instance per table in
the pipeline file and runs every instance in one task group:

1. ``setup()`` on every component, sinks first and sources last, so that a
   source's first event always has somewhere to go;
2. ``run()`` on all of them at once;
3. ``teardown()`` on every component that finished ``setup()``, even after an
   error or an abort.

Events travel in batches (tuples) over bounded memory streams. A component that
cannot keep up makes ``Output.send`` wait in its producers, which is how
backpressure reaches the sources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from speaker.events import Event

if TYPE_CHECKING:
    from speaker.engine import PipelineContext

Batch = tuple[Event, ...]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a component that has none."""


class Output:
    """The streams from one component to each of its downstream consumers.

    Each consumer receives only the event types it accepts. A consumer that
    has stopped (its stream is closed) is dropped, so that one failing sink
    does not stop its producer from feeding the others.
    """

    def __init__(self, owner: str, routes: Sequence[Route], max_batch: int, log: Any) -> None:
        self._owner = owner
        self._routes = list(routes)
        self._max_batch = max_batch
        self._pending: list[Event] = []
        self._log = log
        #: When false, ``send`` collects events until ``flush``. The engine
        #: turns this off while a stage handles one input batch.
        self.autoflush = True

    @property
    def connected(self) -> bool:
        """Return whether any consumer is still receiving."""
        return bool(self._routes)

    async def send(self, event: Event) -> None:
        """Send one event downstream, waiting while a consumer's buffer is full."""
        pending = self._pending
        pending.append(event)
        if self.autoflush or len(pending) >= self._max_batch:
            await self.flush()

    async def send_many(self, events: Iterable[Event]) -> None:
        """Send several events, in batches of at most ``max_batch``."""
        self._pending.extend(events)
        if self.autoflush or len(self._pending) >= self._max_batch:
            await self.flush()

    async def flush(self) -> None:
        """Push the collected events to every consumer."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for start in range(0, len(pending), self._max_batch):
            await self._push(tuple(pending[start : start + self._max_batch]))

    async def _push(self, batch: Batch) -> None:
        for route in tuple(self._routes):
            selected = batch if route.accepts_all else tuple(e for e in batch if isinstance(e, route.accepts))
            if not selected:
                continue
            try:
                await route.stream.send(selected)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._routes.remove(route)
                self._log.warning("consumer_gone", consumer=route.consumer, dropped=len(selected))

    async def aclose(self) -> None:
        """Flush, then close every stream so that consumers see the end of input."""
        try:
            await self.flush()
        finally:
            for route in self._routes:
                await route.stream.aclose()
            self._routes.clear()


@dataclasses.dataclass
class Route:
    """One edge of the pipeline graph, seen from its producer."""

    consumer: str
    stream: ObjectSendStream[Batch]
    accepts: tuple[type[Event], ...]
    accepts_all: bool


class Input:
    """The merged input of a stage or sink: batches from all of its upstream components."""

    def __init__(self, stream: ObjectReceiveStream[Batch]) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[Batch]:
        async for batch in self._stream:
            yield batch

    async def receive(self) -> Batch:
        """Return the next batch. Raises anyio.EndOfStream when every producer has finished."""
        return await self._stream.receive()

    def statistics(self) -> Any:
        """Return the underlying stream's statistics (``current_buffer_used`` and so on)."""
        return self._stream.statistics()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Component:
    """Common part of sources, stages and sinks.

    Subclasses set ``type_name`` (the ``type`` written in pipeline files),
    ``Options``, ``accepts`` and ``emits``, and a docstring whose first line
    the ``components`` command prints.
    """

    type_name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    accepts: ClassVar[tuple[type[Event], ...]] = ()
    emits: ClassVar[tuple[type[Event], ...]] = ()

    def __init__(self, name: str, options: Any, context: PipelineContext) -> None:
        self.name = name
        self.options = options
        self.context = context
        self.log = structlog.get_logger("speaker").bind(component=name)

    async def setup(self) -> None:
        """Acquire resources (sockets, files, containers) before any component runs."""

    async def teardown(self) -> None:
        """Release what ``setup`` and ``run`` acquired.

        The engine calls it after ``run`` ends, including after an error or a
        cancellation, inside a shielded scope with a time limit.
        """


class Source(Component):
    """A producer of events from outside the pipeline: Docker, the kernel, files.

    ``run`` produces until it returns or the engine cancels it. When the
    pipeline is asked to stop, the engine sets ``self.stopping`` and cancels
    ``run`` after ``drain_timeout`` seconds, so a source that still has
    buffered input (an audit socket, a log file) can drain it first by
    watching ``stopping``.
    """

    kind = "source"
    drain_timeout: ClassVar[float] = 0.0

    def __init__(self, name: str, options: Any, context: PipelineContext) -> None:
        super().__init__(name, options, context)
        self.stopping = anyio.Event()

    async def run(self, output: Output) -> None:
        raise NotImplementedError(f"{type(self).__qualname__} must implement run()")


class Stage(Component):
    """A transformer: consumes events from its inputs and emits new ones.

    Most stages implement ``process`` (called once per event) and, if they
    hold state, ``finish`` (called once when every input has ended). Stages
    on hot paths may override ``process_batch`` instead. A stage
    that needs timers sets ``tick_interval`` and implements ``tick``. A stage
    with its own concurrency can override ``run`` as a whole.
    """

    kind = "stage"
    #: Seconds between calls to ``tick``, or None for no ticks.
    tick_interval: ClassVar[float | None] = None

    async def process(self, event: Event, output: Output) -> None:
        raise NotImplementedError(f"{type(self).__qualname__} must implement process() or run()")

    async def tick(self, now: float, output: Output) -> None:
        """Handle the passing of time; ``now`` is ``time.monotonic()``."""

    async def finish(self, output: Output) -> None:
        """Emit whatever the stage still holds, after the last input event."""

    async def run(self, input: Input, output: Output) -> None:
        """Feed every input event to ``process``, calling ``tick`` on schedule.

        The events a stage emits while handling one input batch leave as one
        batch, so that per-event overhead stays low on busy edges.
        """
        interval = self.tick_interval
        next_tick = anyio.current_time() + interval if interval else None
        while True:
            batch: Batch | None = None
            if next_tick is None:
                try:
                    batch = await input.receive()
                except anyio.EndOfStream:
                    break
            else:
                ended = False
                with anyio.move_on_after(max(0.0, next_tick - anyio.current_time())):
                    try:
                        batch = await input.receive()
                    except anyio.EndOfStream:
                        ended = True
                if ended:
                    break
                now = anyio.current_time()
                if interval is not None and now >= next_tick:
                    next_tick = now + interval
                    await self.tick(now, output)
                    await output.flush()
            if batch is None:
                continue
            output.autoflush = False
            try:
                await self.process_batch(batch, output)
            finally:
                output.autoflush = True
            await output.flush()
        await self.finish(output)
        await output.flush()

    async def process_batch(self, batch: Batch, output: Output) -> None:
        """Call ``process`` for each event; override to handle a whole batch at once on hot paths."""
        process = self.process
        for event in batch:
            await process(event, output)


class Sink(Component):
    """A consumer that writes events out of the pipeline: files, ioctls, sockets.

    Sinks implement ``write`` (once per event) or ``write_batch``, and
    ``flush``, which the engine calls once the input has ended, before
    ``teardown``. Data a sink has received must be on disk (or delivered)
    when ``flush`` returns, because that is what a graceful stop promises.
    """

    kind = "sink"

    async def write(self, event: Event) -> None:
        raise NotImplementedError(f"{type(self).__qualname__} must implement write() or write_batch()")

    async def write_batch(self, batch: Batch) -> None:
        for event in batch:
            await self.write(event)

    async def flush(self) -> None:
        """Make everything written so far durable."""

    async def run(self, input: Input) -> None:
        """Write every input batch, then flush."""
        async for batch in input:
            await self.write_batch(batch)
        await self.flush()
