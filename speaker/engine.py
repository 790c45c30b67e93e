"""Run a validated pipeline: one anyio task group, bounded streams, clean stops.

How a pipeline ends:

* **Graceful stop** (the first SIGINT or SIGTERM, a component's
  ``request_stop``, or a component error): each source's ``stopping`` event
  is set and the source is cancelled after its ``drain_timeout``. When a
  producer ends, its output streams close, so each stage receives the end of its
  input, calls ``finish`` and closes its own outputs, and each sink flushes.
  Nothing a sink has received is dropped.
* **Abort** (a second signal): every task is cancelled at once. Teardown
  still runs, but sinks do not flush.

Whatever happens, each component that finished ``setup`` gets ``teardown``,
shielded from cancellation and bounded by the ``teardown_timeout`` setting.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from collections.abc import Iterable

import anyio
import structlog
from anyio.abc import ObjectSendStream, TaskGroup, TaskStatus

from speaker.component import Batch, Component, Input, Output, Route, Sink, Source, Stage
from speaker.config import PipelineSpec
from speaker.errors import ComponentError


class ExitCode(enum.IntEnum):
    """Process exit codes of ``python -m speaker``. The README lists them for users."""

    OK = 0
    #: A component raised, or a source could not start (for example no
    #: permission to read audit, or the Docker daemon is unreachable).
    FAILED = 1
    #: Invalid command line or pipeline file. Nothing was started.
    USAGE = 2
    #: The pipeline finished, but its result is incomplete: a trace lost
    #: records, or a container died before it was ready. Output was written and
    #: marked as incomplete.
    INCOMPLETE = 3
    #: Enforcement reported violations and the pipeline was asked to fail on them.
    VIOLATIONS = 4
    #: A signal during setup, or a second signal while stopping, aborted the
    #: pipeline before sinks could flush.
    ABORTED = 130


@dataclasses.dataclass
class ComponentFailure:
    component: str
    error: BaseException
    during: str


@dataclasses.dataclass
class PipelineResult:
    """What a finished pipeline reports to the CLI."""

    exit_code: ExitCode
    stop_reason: str
    failures: list[ComponentFailure]
    problems: list[str]
    #: The problems that made the run fail (exit code 1), such as a crashed enforced container.
    errors: list[str] = dataclasses.field(default_factory=list)


#: Problem exit codes from least to most severe: when a run has several, it
#: exits with the most severe, so a crashed enforced container (FAILED) is not
#: hidden by an audit loss on the host (INCOMPLETE).
PROBLEM_SEVERITY = (ExitCode.OK, ExitCode.INCOMPLETE, ExitCode.VIOLATIONS, ExitCode.FAILED)


def _severity(code: ExitCode) -> int:
    return PROBLEM_SEVERITY.index(code) if code in PROBLEM_SEVERITY else len(PROBLEM_SEVERITY) + int(code)


class PipelineContext:
    """The engine as one component sees it: stop requests and result reporting."""

    def __init__(self, engine: Engine, component: str) -> None:
        self._engine = engine
        self.component = component
        self.spec = engine.spec

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop of the whole pipeline. Later requests are ignored."""
        self._engine.request_stop(f"{self.component}: {reason}")

    @property
    def stop_requested(self) -> bool:
        return self._engine.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Return why the pipeline is stopping, or None while it runs."""
        return self._engine.stop_reason

    @property
    def failed_components(self) -> list[str]:
        """Return the names of the components that have raised so far."""
        return [failure.component for failure in self._engine.failures]

    def report_problem(self, code: ExitCode, message: str) -> None:
        """Make the pipeline exit with ``code`` (unless a worse one is set) and print ``message`` at exit."""
        self._engine.report_problem(code, f"{self.component}: {message}")


class Engine:
    """Builds the components of a PipelineSpec, wires them and runs them."""

    def __init__(self, spec: PipelineSpec, *, handle_signals: bool = True) -> None:
        self.spec = spec
        self.handle_signals = handle_signals
        self.log = structlog.get_logger("speaker").bind(pipeline=str(spec.path))
        self.components: dict[str, Component] = {}
        self.outputs: dict[str, Output] = {}
        self.inputs: dict[str, Input] = {}
        self.stop_reason: str | None = None
        self.failures: list[ComponentFailure] = []
        self.problems: list[tuple[ExitCode, str]] = []
        self.aborted = False
        self._task_group: TaskGroup | None = None
        self._source_scopes: dict[str, anyio.CancelScope] = {}
        self._source_done: dict[str, anyio.Event] = {}
        self._setup_scope: anyio.CancelScope | None = None
        #: "setup", "run" or "teardown": decides what a signal does.
        self._state = "setup"

    # --- Building ---------------------------------------------------------

    def build(self) -> None:
        """Instantiate every component and create one bounded stream per consumer."""
        settings = self.spec.settings
        order = topological_order(self.spec)
        for name in order:
            component_spec = self.spec.components[name]
            context = PipelineContext(self, name)
            try:
                self.components[name] = component_spec.cls(name, component_spec.options, context)
            except Exception as exc:
                self._record_failure(name, exc, "init")
                return

        send_streams: dict[str, ObjectSendStream[Batch]] = {}
        for name in order:
            component_spec = self.spec.components[name]
            if component_spec.section == "sources":
                continue
            send, receive = anyio.create_memory_object_stream[Batch](settings.buffer)
            send_streams[name] = send
            self.inputs[name] = Input(receive)

        routes: dict[str, list[Route]] = {name: [] for name in order}
        for name in order:
            consumer = self.spec.components[name]
            for upstream in consumer.inputs:
                producer_emits = self.spec.components[upstream].cls.emits
                accepts = consumer.cls.accepts
                accepts_all = all(issubclass(cls, accepts) for cls in producer_emits) if accepts else False
                routes[upstream].append(
                    Route(
                        consumer=name,
                        stream=send_streams[name].clone(),
                        accepts=accepts,
                        accepts_all=accepts_all,
                    )
                )
        # Only the clones stay open, so a consumer's input ends exactly when
        # all of its producers have closed their outputs.
        for stream in send_streams.values():
            stream.close()

        for name, component in self.components.items():
            if isinstance(component, (Source, Stage)):
                log = component.log
                self.outputs[name] = Output(name, routes[name], settings.max_batch, log)

    # --- Stopping ---------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        self.log.info("pipeline_stopping", reason=reason)
        for name, component in self.components.items():
            if isinstance(component, Source):
                component.stopping.set()
                if self._task_group is not None:
                    self._task_group.start_soon(self._cancel_source_later, name, component.drain_timeout)

    async def _cancel_source_later(self, name: str, delay: float) -> None:
        done = self._source_done.setdefault(name, anyio.Event())
        with anyio.move_on_after(delay):
            await done.wait()
        scope = self._source_scopes.get(name)
        if scope is not None:
            scope.cancel()

    def abort(self, reason: str) -> None:
        self.aborted = True
        self.log.warning("pipeline_aborting", reason=reason)
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def report_problem(self, code: ExitCode, message: str) -> None:
        self.problems.append((code, message))
        self.log.warning("pipeline_problem", problem=message, exit_code=int(code))

    # --- Running ----------------------------------------------------------

    async def run(self) -> PipelineResult:
        """Run the pipeline to its end and return its result. Never raises for component errors."""
        if not self.components and not self.failures:
            self.build()
        if self.failures:
            return self._result()
        order = topological_order(self.spec)
        ready: list[str] = []
        self.log.info("pipeline_starting", components=len(order))
        async with anyio.create_task_group() as outer:
            if self.handle_signals:
                # Wait until the receiver is installed, so that a signal during
                # setup already gets the handling described in _on_signal.
                await outer.start(self._watch_signals)
            try:
                with anyio.CancelScope() as self._setup_scope:
                    for name in reversed(order):
                        try:
                            await self.components[name].setup()
                        except Exception as exc:
                            self._record_failure(name, exc, "setup")
                            break
                        ready.append(name)
                if not self.failures and not self.aborted:
                    await self._run_all()
            finally:
                self._state = "teardown"
                await self._teardown([name for name in order if name in ready])
            outer.cancel_scope.cancel()
        return self._result()

    async def _run_all(self) -> None:
        self._state = "run"
        async with anyio.create_task_group() as group:
            self._task_group = group
            for name, component in self.components.items():
                group.start_soon(self._run_component, name, component)
            self.log.info("pipeline_started")
        self._task_group = None

    async def _watch_signals(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # SIGHUP counts too: a trace whose terminal closes still stops gracefully.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                self._on_signal(signal.Signals(signum).name)

    def _on_signal(self, name: str) -> None:
        """Stop gracefully on the first signal and abort on the second.

        A signal during setup cancels the setup, since nothing has run yet.
        Signals during teardown are logged and ignored, because teardown
        restores host state (such as the kernel audit settings), and it is
        bounded by ``teardown_timeout``.
        """
        if self._state == "setup":
            self.aborted = True
            self.stop_reason = f"received {name} during setup"
            self.log.warning("pipeline_aborting", reason=self.stop_reason)
            if self._setup_scope is not None:
                self._setup_scope.cancel()
        elif self._state == "teardown":
            self.log.warning(
                "signal_ignored",
                signal=name,
                reason="teardown in progress",
                teardown_timeout=str(self.spec.settings.teardown_timeout),
            )
        elif self.stop_reason is None:
            self.request_stop(f"received {name}")
        else:
            self.abort(f"received a second signal ({name}) while stopping")

    async def _run_component(self, name: str, component: Component) -> None:
        output = self.outputs.get(name)
        input = self.inputs.get(name)
        try:
            if isinstance(component, Source):
                assert output is not None
                with anyio.CancelScope() as scope:
                    self._source_scopes[name] = scope
                    if self.stop_reason is not None:
                        scope.cancel()
                    try:
                        await component.run(output)
                    finally:
                        self._source_done.setdefault(name, anyio.Event()).set()
            elif isinstance(component, Stage):
                assert input is not None and output is not None
                await component.run(input, output)
            elif isinstance(component, Sink):
                assert input is not None
                try:
                    await component.run(input)
                except Exception:
                    # Keep what the sink already received, then report the error.
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self.spec.settings.teardown_timeout):
                        await component.flush()
                    raise
        except Exception as exc:
            self._record_failure(name, exc, "run")
        finally:
            with anyio.CancelScope(shield=True):
                if output is not None:
                    try:
                        await output.aclose()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                if input is not None:
                    await input.aclose()

    def _record_failure(self, name: str, exc: BaseException, during: str) -> None:
        self.failures.append(ComponentFailure(name, exc, during))
        spec = self.spec.components[name]
        self.log.error(
            "component_failed",
            component=name,
            type=spec.type_name,
            during=during,
            error=str(exc) if isinstance(exc, ComponentError) else f"{type(exc).__name__}: {exc}",
            exc_info=None if isinstance(exc, ComponentError) else exc,
        )
        self.request_stop(f"{name} failed")

    async def _teardown(self, names: Iterable[str]) -> None:
        timeout = self.spec.settings.teardown_timeout
        for name in names:
            component = self.components[name]
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(timeout) as scope:
                    try:
                        await component.teardown()
                    except Exception as exc:
                        self._record_failure(name, exc, "teardown")
                if scope.cancelled_caught:
                    self._record_failure(name, TimeoutError(f"teardown took longer than {timeout}"), "teardown")

    def _result(self) -> PipelineResult:
        problems = [message for _, message in self.problems]
        if self.aborted:
            code = ExitCode.ABORTED
        elif self.failures:
            code = ExitCode.FAILED
        elif self.problems:
            code = max((code for code, _ in self.problems), key=_severity)
        else:
            code = ExitCode.OK
        self.log.info("pipeline_finished", exit_code=int(code), reason=self.stop_reason or "sources finished")
        return PipelineResult(
            exit_code=code,
            stop_reason=self.stop_reason or "sources finished",
            failures=list(self.failures),
            problems=problems,
            errors=[message for problem_code, message in self.problems if problem_code == ExitCode.FAILED],
        )


def topological_order(spec: PipelineSpec) -> list[str]:
    """Return component names with every producer before its consumers, in file order otherwise."""
    order: list[str] = []
    placed: set[str] = set()
    pending = list(spec.components)
    while pending:
        progressed = False
        for name in list(pending):
            if all(upstream in placed for upstream in spec.components[name].inputs):
                order.append(name)
                placed.add(name)
                pending.remove(name)
                progressed = True
        if not progressed:
            raise ValueError(f"the pipeline graph has a cycle among {pending}")
    return order


async def run_pipeline(spec: PipelineSpec, *, handle_signals: bool = True) -> PipelineResult:
    """Build and run ``spec``; the convenience entry point for the CLI and tests."""
    engine = Engine(spec, handle_signals=handle_signals)
    engine.build()
    return await engine.run()

