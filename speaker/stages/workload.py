"""Exercise a running container with a host command, then stop it so that its shutdown is traced."""

from __future__ import annotations

import collections
import dataclasses
import math
import shlex
import time
from typing import Any

import aiodocker
import anyio
from anyio.abc import TaskGroup

from speaker.component import Input, Output, Stage
from speaker.engine import ExitCode
from speaker.events import ContainerAction, ContainerEvent, Event, Phase, PhaseChange, TraceIncomplete
from speaker.options import Duration, OptionError, option

#: Placeholders that ``command`` arguments may contain.
PLACEHOLDERS = ("pid", "container", "short_id", "name")
#: Output lines of the command kept for the log.
TAIL_LINES = 5


@dataclasses.dataclass(frozen=True)
class WorkloadOptions:
    command: list[str] = option(
        [],
        help="Host command run once the container is running, as a list of arguments. {pid} (the container's "
        "init pid), {container}, {short_id} and {name} are replaced; with --network none, reach the container "
        'through its network namespace: ["nsenter", "-t", "{pid}", "-n", "redis-benchmark", ...]. '
        "Empty runs no command.",
    )
    delay: Duration = option(Duration.parse("0s"), help="Wait between the running phase change and the command.")
    duration: Duration = option(
        Duration.parse("0s"), help="Time to let the container run after the command (or instead of it) before the stop."
    )
    timeout: Duration = option(
        Duration.parse("5m"), help="Maximum run time of the command; after it the command is killed and reported."
    )
    stop: bool = option(
        True,
        help="Stop the container with Docker's stop (stop signal, then SIGKILL after stop_timeout) once the "
        "workload is done, or once the detector has given up.",
    )
    stop_timeout: Duration = option(
        Duration.parse("10s"), help="Docker's stop timeout: time between the stop signal and SIGKILL."
    )
    docker_url: str = option("", help="Docker API address; empty uses DOCKER_HOST or /var/run/docker.sock.")


class Workload(Stage):
    """Run the workload against each container that enters running, then stop the container gracefully.

    Every event passes through unchanged, so the stage can sit anywhere after
    the phase machine. A failing command is reported with its exit code and
    last output lines, makes the result incomplete, and the container is
    still stopped.
    """

    type_name = "workload"
    Options = WorkloadOptions
    accepts = (Event,)
    emits = (Event,)

    @classmethod
    def check_options(cls, options: WorkloadOptions) -> None:
        for index, argument in enumerate(options.command):
            try:
                argument.format(**{name: "" for name in PLACEHOLDERS})
            except (KeyError, IndexError, ValueError) as exc:
                known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
                raise OptionError(
                    f"invalid placeholder in {argument!r}: {exc}; known placeholders: {known} "
                    "(write {{ and }} for literal braces)",
                    f"command[{index}]",
                ) from None

    async def setup(self) -> None:
        self.docker: aiodocker.Docker | None = None
        self.started: set[str] = set()
        self.names: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.exited: set[str] = set()

    async def teardown(self) -> None:
        if self.docker is not None:
            await self.docker.close()

    async def run(self, input: Input, output: Output) -> None:
        async with anyio.create_task_group() as group:
            async for batch in input:
                for event in batch:
                    self._watch(event, group)
                await output.send_many(batch)
            # The input ended, so the pipeline is stopping: a workload still
            # going would only race the teardown of the container.
            group.cancel_scope.cancel()

    def _watch(self, event: Event, group: TaskGroup) -> None:
        container = event.container_id
        if isinstance(event, ContainerEvent):
            if event.name:
                self.names[container] = event.name
            if event.pid:
                self.pids[container] = event.pid
            if event.action == ContainerAction.DIE:
                self.exited.add(container)
        elif isinstance(event, PhaseChange) and event.phase == Phase.RUNNING:
            if container not in self.started:
                self.started.add(container)
                group.start_soon(self._exercise, container)
        elif isinstance(event, TraceIncomplete) and event.reason == "detector_timeout":
            if container not in self.started:
                self.started.add(container)
                self.log.warning("workload_skipped", container=container[:12], reason=event.detail)
                group.start_soon(self._stop, container)

    async def _exercise(self, container: str) -> None:
        options = self.options
        await anyio.sleep(options.delay)
        if options.command:
            await self._run_command(container)
        if options.duration:
            self.log.info("workload_waiting", container=container[:12], duration=str(options.duration))
            await anyio.sleep(options.duration)
        await self._stop(container)

    async def _run_command(self, container: str) -> None:
        try:
            pid = await self._pid(container)
        except aiodocker.DockerError as exc:
            self._fail(container, f"cannot inspect the container for its pid: {exc.message}")
            return
        values = {"pid": str(pid), "container": container, "short_id": container[:12], "name": self.names.get(container, "")}
        command = [argument.format(**values) for argument in self.options.command]

        self.log.info("workload_started", container=container[:12], command=shlex.join(command))
        started = time.monotonic()
        stdout: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        stderr: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        try:
            process = await anyio.open_process(command)
        except OSError as exc:
            self._fail(container, f"cannot start {command[0]!r}: {exc.strerror}")
            return

        timed_out = False
        async with process:
            async with anyio.create_task_group() as group:
                group.start_soon(_tail, process.stdout, stdout)
                group.start_soon(_tail, process.stderr, stderr)
                with anyio.move_on_after(self.options.timeout) as scope:
                    await process.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    process.kill()
                    await process.wait()

        elapsed = round(time.monotonic() - started, 3)
        if timed_out:
            self._fail(container, f"{command[0]} did not finish within {self.options.timeout}, so it was killed", stderr)
        elif process.returncode != 0:
            self._fail(container, f"{command[0]} exited with code {process.returncode}", stderr)
        else:
            self.log.info(
                "workload_finished", container=container[:12], seconds=elapsed, output_tail=list(stdout)
            )

    def _fail(self, container: str, message: str, stderr: collections.deque[str] | None = None) -> None:
        tail = list(stderr or ())
        self.log.error("workload_failed", container=container[:12], error=message, stderr_tail=tail)
        detail = f"; last stderr lines: {' | '.join(tail)}" if tail else ""
        self.context.report_problem(
            ExitCode.INCOMPLETE,
            f"container {container[:12]}: the workload failed ({message}{detail}), so the running phase may lack syscalls",
        )

    async def _client(self) -> aiodocker.Docker:
        if self.docker is None:
            self.docker = aiodocker.Docker(url=self.options.docker_url or None)
        return self.docker

    async def _pid(self, container: str) -> int:
        pid = self.pids.get(container)
        if pid:
            return pid
        docker = await self._client()
        info = await docker.containers.container(container).show()
        return int(info["State"]["Pid"])

    async def _stop(self, container: str) -> None:
        if not self.options.stop or container in self.exited:
            return
        docker = await self._client()
        timeout = math.ceil(self.options.stop_timeout)
        self.log.info("container_stopping", container=container[:12], stop_timeout=timeout)
        try:
            await docker.containers.container(container).stop(t=timeout)
        except aiodocker.DockerError as exc:
            if exc.status in (304, 404):
                return  # already stopped or removed
            self.log.error("container_stop_failed", container=container[:12], error=exc.message)
            self.context.report_problem(
                ExitCode.FAILED, f"cannot stop container {container[:12]}: {exc.message}; stop it with docker stop"
            )


async def _tail(stream: Any, lines: collections.deque[str]) -> None:
    """Keep the last lines of a process's output stream."""
    if stream is None:
        return
    pending = b""
    async for chunk in stream:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            _keep(line, lines)
    _keep(pending, lines)


def _keep(line: bytes, lines: collections.deque[str]) -> None:
    # redis-benchmark redraws its progress line with carriage returns.
    text = line.split(b"\r")[-1].decode("utf-8", "replace").strip()
    if text:
        lines.append(text)
