"""Report container lifecycle events from Docker, and optionally launch the container to trace."""

from __future__ import annotations

import collections
import dataclasses
import json
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio
from aiodocker.events import DockerEvents as EventStream

from speaker.component import Output, Source
from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import ContainerAction, ContainerEvent, ContainerOutput
from speaker.launch.create import create_body
from speaker.launch.docker_state import ContainerFacts, facts_from_inspect, parse_action
from speaker.launch.options import LaunchOptions, parse_launch
from speaker.launch.output import RecentLines, output_lines
from speaker.launch.seccomp import ProfileError, security_options, write_log_profile
from speaker.options import Duration, OptionError, option

#: Label that marks a container launched by SPEAKER; its value is unique per run.
LAUNCH_LABEL = "speaker.launch"
#: Errors of a Docker request that a reconnect can cure.
_DOCKER_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, ValueError)
#: Time to wait for the destroy event of a container that SPEAKER removed.
_DESTROY_WAIT = 5.0


@dataclasses.dataclass(frozen=True)
class DockerEventsOptions:
    launch: dict[str, Any] = option(
        {},
        help="Container to create, start and trace, as a table with image (required), command, entrypoint, env, "
        "ports, user, name, labels, network, stop_timeout, stop_signal, runtime, seccomp, cap_add, cap_drop, tmpfs, "
        "volumes, read_only, security_opt, healthcheck, auto_remove, keep, config and host_config. "
        "Empty means watch mode.",
    )
    watch_label: str = option(
        "speaker.trace",
        help="In watch mode, trace every container that has this label, whatever its value.",
    )
    docker_host: str = option(
        "", help="Docker daemon address, such as unix:///var/run/docker.sock; empty uses DOCKER_HOST or that socket."
    )
    profile_dir: Path = option(
        Path("/run/speaker"), help="Directory where the log-everything seccomp profile trace-log.json is written."
    )
    settle: Duration = option(
        Duration.parse("1s"),
        help="Time to wait after the launched container exits, so that its last audit records arrive, "
        "before the pipeline stops.",
    )
    report_exit: bool = option(
        True,
        help="Report a launched container that exits by itself with a non-zero code as an incomplete result "
        "(exit code 3), because its trace may end early. Set false where a later stage reports the exit, as "
        "the enforce stage does.",
    )
    output: bool = option(True, help="Emit the containers' stdout and stderr lines as ContainerOutput events.")
    reconnect_max: Duration = option(
        Duration.parse("10s"), min=0.1, help="Maximum wait between two attempts to reconnect to the Docker daemon."
    )


@dataclasses.dataclass
class _Container:
    """State the source keeps for one traced container."""

    name: str = ""
    image: str = ""
    pid: int = 0
    stop_signal: int | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    running: bool = False
    started_at: float = 0.0
    #: Whether a kill or stop event came before the container exited.
    stop_requested: bool = False
    output: RecentLines = dataclasses.field(default_factory=RecentLines)
    streaming: bool = False


class DockerEvents(Source):
    """Emit ContainerEvent and ContainerOutput for the launched container, or for every labeled one."""

    type_name = "docker_events"
    Options = DockerEventsOptions
    emits = (ContainerEvent, ContainerOutput)

    @classmethod
    def check_options(cls, options: DockerEventsOptions) -> None:
        if options.launch:
            parse_launch(options.launch)
        elif not options.watch_label:
            raise OptionError("set a launch table, or a watch_label for watch mode", "watch_label")

    async def setup(self) -> None:
        options = self.options
        self.launch: LaunchOptions | None = parse_launch(options.launch) if options.launch else None
        self.known: dict[str, _Container] = {}
        self.launched_id = ""
        self._seen_keys: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=1024)
        self._destroyed = anyio.Event()
        self._last_event_nano = 0
        self._token = uuid.uuid4().hex[:16]
        self.security_opt: list[str] = []
        if self.launch is not None:
            try:
                self.security_opt = security_options(self.launch.seccomp)
            except ProfileError as exc:
                raise ComponentError(str(exc)) from None
        profile = self._write_profile()
        self.docker = aiodocker.Docker(url=options.docker_host or None)
        try:
            await self._check_daemon()
        except BaseException:
            await self.docker.close()
            raise
        if self.launch is None:
            self.log.info(
                "watching",
                label=options.watch_label,
                run_with=f"docker run --label {shlex.quote(options.watch_label + '=1')} "
                f"--security-opt seccomp={shlex.quote(str(profile))} IMAGE",
            )

    def _write_profile(self) -> Path | None:
        if self.launch is not None and self.launch.seccomp != "log":
            return None
        try:
            path = write_log_profile(self.options.profile_dir)
        except OSError as exc:
            if self.launch is not None:
                # The launched container gets the profile's text, so the file is only informative.
                self.log.warning("log_profile_not_written", directory=str(self.options.profile_dir), error=exc.strerror)
                return None
            raise ComponentError(
                f"cannot write the seccomp profile to {self.options.profile_dir}: {exc.strerror}; set profile_dir"
            ) from None
        self.log.info("log_profile_written", path=str(path))
        return path

    async def _check_daemon(self) -> None:
        where = self.options.docker_host or "the default socket"
        try:
            version = await self.docker.version()
        except _DOCKER_ERRORS as exc:
            raise ComponentError(
                f"cannot reach the Docker daemon at {where}: {exc}. Start dockerd, or set docker_host"
            ) from None
        self.log.info("docker_connected", version=version.get("Version", ""), host=where)
        if self.launch is not None:
            try:
                await self.docker.images.inspect(self.launch.image)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise ComponentError(f"cannot inspect the image {self.launch.image}: {exc.message}") from None
                raise ComponentError(
                    f"image {self.launch.image} not found: build it (images/build.sh builds the speaker-demo images) "
                    "or pull it, or set launch.image"
                ) from None

    async def run(self, output: Output) -> None:
        self.output = output
        try:
            async with anyio.create_task_group() as group:
                self.group = group
                group.start_soon(self._follow_events)
                if self.launch is not None:
                    group.start_soon(self._start_container)
                await self.stopping.wait()
                group.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Report an expected failure of one task as itself, so that the log shows its message.
            expected = _first_component_error(group)
            if expected is None:
                raise
            raise expected from None

    # --- Launch mode -------------------------------------------------------------

    async def _start_container(self) -> None:
        assert self.launch is not None
        labels = {LAUNCH_LABEL: self._token}
        body = create_body(self.launch, security_opt=self.security_opt, labels=labels)
        try:
            container = await self.docker.containers.create(body, name=self.launch.name or None)
        except aiodocker.DockerError as exc:
            raise ComponentError(f"cannot create the container from {self.launch.image}: {exc.message}") from None
        self.launched_id = container.id
        try:
            await container.start()
        except aiodocker.DockerError as exc:
            raise ComponentError(f"cannot start container {container.id[:12]}: {exc.message}") from None
        self.log.info("container_started", container=container.id[:12], image=self.launch.image)

    async def _finish_launched(self, container_id: str, exit_code: int | None) -> None:
        """Wait for the last records, report an unrequested exit, remove the container, then stop the pipeline."""
        assert self.launch is not None
        await anyio.sleep(float(self.options.settle))
        tracked = self.known.get(container_id) or _Container()
        if not tracked.stop_requested:
            self.log.warning(
                "container_exited_by_itself",
                container=container_id[:12],
                name=tracked.name,
                exit_code=exit_code,
                last_output=tracked.output.text(),
            )
            if exit_code not in (0, None) and self.options.report_exit:
                self.context.report_problem(
                    ExitCode.INCOMPLETE,
                    f"container {tracked.name or container_id[:12]} exited by itself with code {exit_code} before "
                    f"anything stopped it, so its trace may end early (the syscalls so far are kept); "
                    f"last output: {tracked.output.text()}",
                )
        if not self.launch.keep and not self.launch.auto_remove:
            await self._remove(container_id)
        if not self.launch.keep:
            with anyio.move_on_after(_DESTROY_WAIT):
                await self._destroyed.wait()
        self.context.request_stop(f"container {tracked.name or container_id[:12]} exited")

    async def _remove(self, container_id: str) -> bool:
        """Remove a container; return False when it was already gone or could not be removed."""
        try:
            await self.docker.containers.container(container_id).delete(force=True, v=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                self.log.warning("container_not_removed", container=container_id[:12], error=exc.message)
            return False
        return True

    # --- The event stream --------------------------------------------------------

    async def _follow_events(self) -> None:
        """Read the event stream, reconnecting with backoff; after a break, report the gap and resynchronize."""
        delay = 0.5
        gap_start: float | None = None
        since = time.time() - 1.0
        while True:
            if gap_start is not None:
                try:
                    await self.docker.version()
                except _DOCKER_ERRORS as exc:
                    self.log.info("docker_reconnect_failed", error=str(exc), retry_in=delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, float(self.options.reconnect_max))
                    continue
                await self._report_gap(gap_start)
                gap_start = None
                delay = 0.5
            if self._last_event_nano:
                since = self._last_event_nano / 1e9
            error = await self._read_stream(since)
            gap_start = time.time()
            self.log.warning("docker_events_interrupted", error=error or "the stream ended", retry_in=delay)
            await anyio.sleep(delay)

    async def _read_stream(self, since: float) -> str:
        """Read one connection of the event stream until it ends; return the error that ended it, if any."""
        label = f"{LAUNCH_LABEL}={self._token}" if self.launch is not None else self.options.watch_label
        filters = json.dumps({"type": ["container"], "label": [label]})
        stream = EventStream(self.docker)
        subscriber = stream.subscribe(filters=filters, since=f"{since:.9f}")
        error = ""
        try:
            while True:
                event = await subscriber.get()
                if event is None:
                    break
                await self._handle_event(event)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await stream.stop()
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
        return error

    async def _handle_event(self, raw: dict[str, Any]) -> None:
        action, argument = parse_action(str(raw.get("Action") or raw.get("status") or ""))
        actor = raw.get("Actor") or {}
        container_id = actor.get("ID") or raw.get("id") or ""
        if action is None or not container_id:
            return

        nano = int(raw.get("timeNano") or 0)
        key = (container_id, str(raw.get("Action")), nano)
        if key in self._seen_keys:
            return
        self._seen_keys.append(key)
        self._last_event_nano = max(self._last_event_nano, nano)

        attributes = actor.get("Attributes") or {}
        tracked = self.known.get(container_id)
        if tracked is None:
            if action is ContainerAction.DESTROY:
                return
            tracked = self.known[container_id] = _Container(
                name=attributes.get("name", ""), image=attributes.get("image", "")
            )
        event_time = nano / 1e9

        if action in (ContainerAction.CREATE, ContainerAction.START):
            facts = await self._inspect(container_id)
            if facts is not None:
                if action is ContainerAction.START and tracked.running and facts.started_at == tracked.started_at:
                    return
                self._learn(tracked, facts)
            if action is ContainerAction.START:
                tracked.running = True
                self._stream_output(container_id, tracked)
        elif action is ContainerAction.DIE:
            if not tracked.running and tracked.pid == 0 and tracked.started_at:
                return
            tracked.running = False
        elif action in (ContainerAction.KILL, ContainerAction.STOP):
            tracked.stop_requested = True

        signal = _int_or_none(attributes.get("signal")) if action is ContainerAction.KILL else None
        exit_code = _int_or_none(attributes.get("exitCode")) if action is ContainerAction.DIE else None
        health = None
        if action is ContainerAction.HEALTH_STATUS and argument:
            health = argument
        await self._emit(container_id, tracked, action, event_time, signal=signal, exit_code=exit_code, health=health)

        if action is ContainerAction.DIE:
            tracked.pid = 0
            if container_id == self.launched_id:
                self.group.start_soon(self._finish_launched, container_id, exit_code)
        elif action is ContainerAction.DESTROY:
            self.known.pop(container_id, None)
            if container_id == self.launched_id:
                self._destroyed.set()

    async def _emit(
        self,
        container_id: str,
        tracked: _Container,
        action: ContainerAction,
        event_time: float,
        **fields: Any,
    ) -> None:
        # The init pid exists from the start to the exit; a create event is
        # handled after the fact, when the container may already run.
        pid = 0 if action in (ContainerAction.CREATE, ContainerAction.DIE, ContainerAction.DESTROY) else tracked.pid
        event = ContainerEvent(
            container_id=container_id,
            action=action,
            name=tracked.name,
            image=tracked.image,
            pid=pid,
            stop_signal=tracked.stop_signal,
            event_time=event_time,
            labels=dict(tracked.labels),
            **fields,
        )
        self.log.info(
            "container_event",
            container=container_id[:12],
            action=action.value,
            pid=pid or None,
            **{name: value for name, value in fields.items() if value is not None},
        )
        await self.output.send(event)

    async def _inspect(self, container_id: str) -> ContainerFacts | None:
        try:
            data = await self.docker.containers.container(container_id).show()
        except aiodocker.DockerError:
            return None
        return facts_from_inspect(data)

    @staticmethod
    def _learn(tracked: _Container, facts: ContainerFacts) -> None:
        tracked.name = facts.name or tracked.name
        tracked.image = facts.image or tracked.image
        tracked.pid = facts.pid
        tracked.stop_signal = facts.stop_signal
        tracked.labels = dict(facts.labels)
        tracked.started_at = facts.started_at or tracked.started_at

    def _stream_output(self, container_id: str, tracked: _Container) -> None:
        if not self.options.output or tracked.streaming:
            return
        tracked.streaming = True
        for stream in ("stdout", "stderr"):
            self.group.start_soon(self._forward_output, container_id, tracked, stream)

    async def _forward_output(self, container_id: str, tracked: _Container, stream: str) -> None:
        try:
            async for line in output_lines(self.docker, container_id, stream):
                tracked.output.add(stream, line)
                await self.output.send(ContainerOutput(container_id=container_id, stream=stream, line=line))
        finally:
            tracked.streaming = False

    # --- Gaps --------------------------------------------------------------------

    async def _report_gap(self, gap_start: float) -> None:
        """Emit EVENTS_GAP, then events that bring the known containers up to date with a container list."""
        await self.output.send(ContainerEvent(action=ContainerAction.EVENTS_GAP, gap_start=gap_start))
        label = f"{LAUNCH_LABEL}={self._token}" if self.launch is not None else self.options.watch_label
        now = time.time()
        try:
            listed = await self.docker.containers.list(all=True, filters=json.dumps({"label": [label]}))
        except _DOCKER_ERRORS as exc:
            self.log.warning("resync_failed", error=str(exc))
            return
        present = {container.id for container in listed}
        synthesized = 0
        for container_id, tracked in list(self.known.items()):
            facts = await self._inspect(container_id) if container_id in present else None
            if tracked.running and (facts is None or not facts.running or facts.started_at != tracked.started_at):
                finished = facts.finished_at if facts is not None and not facts.running else 0.0
                exit_code = facts.exit_code if facts is not None and not facts.running else None
                tracked.running = False
                await self._emit(container_id, tracked, ContainerAction.DIE, finished or now, exit_code=exit_code)
                tracked.pid = 0
                synthesized += 1
                if container_id == self.launched_id:
                    self.group.start_soon(self._finish_launched, container_id, exit_code)
            if facts is None:
                await self._emit(container_id, tracked, ContainerAction.DESTROY, now)
                self.known.pop(container_id, None)
                synthesized += 1
                if container_id == self.launched_id:
                    self._destroyed.set()
            elif facts.running and not tracked.running:
                self._learn(tracked, facts)
                tracked.running = True
                await self._emit(container_id, tracked, ContainerAction.START, facts.started_at or now)
                self._stream_output(container_id, tracked)
                synthesized += 1
        for container_id in present - set(self.known):
            facts = await self._inspect(container_id)
            if facts is None:
                continue
            tracked = self.known[container_id] = _Container()
            self._learn(tracked, facts)
            await self._emit(container_id, tracked, ContainerAction.CREATE, now)
            synthesized += 1
            if facts.running:
                tracked.running = True
                await self._emit(container_id, tracked, ContainerAction.START, facts.started_at or now)
                self._stream_output(container_id, tracked)
                synthesized += 1
        self.log.warning("docker_events_resynced", gap_seconds=round(now - gap_start, 3), synthesized=synthesized)

    async def teardown(self) -> None:
        docker = getattr(self, "docker", None)
        if docker is None:
            return
        try:
            if self.launched_id and self.launch is not None and not self.launch.keep:
                if await self._remove(self.launched_id):
                    self.log.info("container_removed", container=self.launched_id[:12])
        finally:
            await docker.close()


def _first_component_error(group: BaseExceptionGroup) -> ComponentError | None:
    for error in group.exceptions:
        if isinstance(error, ComponentError):
            return error
        if isinstance(error, BaseExceptionGroup):
            found = _first_component_error(error)
            if found is not None:
                return found
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
