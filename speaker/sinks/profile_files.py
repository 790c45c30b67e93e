"""Write one profile directory per traced container."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
import time
from pathlib import Path
from typing import Literal

import anyio

from speaker.compile.actions import Action, parse_errno
from speaker.compile.plan import DEFAULT_INVARIANTS, INVARIANTS, CompileSettings
from speaker.component import Batch, Sink
from speaker.engine import ExitCode
from speaker.errors import ComponentError
from speaker.events import (
    PHASES,
    ContainerEvent,
    PhaseChange,
    RecordLoss,
    SyscallCounts,
    SyscallRecord,
    TraceIncomplete,
)
from speaker.keep_earlier import check_writable, move_aside
from speaker.options import Duration, OptionError, option
from speaker.profiles.builder import ContainerProfile, ProfileBuilder
from speaker.profiles.directory import is_profile_dir, write_profile_dir
from speaker.profiles.profile_json import FILE_NAME

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True)
class ProfileFilesOptions:
    directory: Path = option(
        Path("profiles"),
        help="Directory that receives one subdirectory per traced container, named after the container "
        "(or its short id when it has no name). Created if missing. A profile that an earlier run left in a "
        "subdirectory is renamed after the time in its profile.json, such as redis.2026-12-04T23-59-01Z, "
        "so the newest profile is always at the usual name.",
    )
    subdirectory: str = option(
        "{name}",
        help="Name of each container's profile directory: {name} is the container name, {image} the last "
        "part of its image name without the tag, {id} the short container id. A name already used by "
        "another container of the same run gets the short id appended.",
    )
    default_action: Literal["kill-process", "errno", "log"] = option(
        "kill-process", help="Action of the Docker seccomp profiles for syscalls a phase does not list."
    )
    errno: str = option("EPERM", help='Errno that denied syscalls return when default_action is "errno", such as "EPERM" or "1".')
    invariants: list[str] = option(
        list(DEFAULT_INVARIANTS),
        help="Safety invariants added to the Docker profiles: "
        + ", ".join(f"{name} ({item.action})" for name, item in INVARIANTS.items())
        + ". Remove a name to switch it off.",
    )
    arch_lists: Literal["observed", "shared"] = option(
        "observed",
        help='"observed": each architecture allows the syscalls traced on it; "shared": every architecture '
        "allows the union, as Docker profiles do.",
    )
    listener_path: str = option(
        "", help="Socket path of the notify supervisor; when set, docker-notify.json with the notify layout is written too."
    )
    write_interval: Duration = option(
        Duration.parse("10s"),
        min=0,
        help="Maximum time a changed profile waits before it is rewritten while the trace runs, so an abort "
        "loses at most this much. Profiles are also written when their container exits and at the end.",
    )


def compile_settings(options: ProfileFilesOptions) -> CompileSettings:
    """Return the compile settings the options describe. Raises ValueError for an invalid errno or invariant."""
    action = Action.parse(f"errno:{options.errno}" if options.default_action == "errno" else options.default_action)
    return CompileSettings(default_action=action, invariants=tuple(options.invariants), arch_lists=options.arch_lists)


class ProfileFiles(Sink):
    """Write each traced container's profile: phase lists, profile.json and Docker seccomp profiles.

    Profiles are written while the trace runs (see ``write_interval``), when a
    container exits, and when the pipeline ends, including after a failure.
    A profile that lost records, never reached a phase, or ended early is
    still written, marked incomplete, and the pipeline exits with code 3.
    """

    type_name = "profile_files"
    Options = ProfileFilesOptions
    accepts = (SyscallCounts, SyscallRecord, PhaseChange, ContainerEvent, RecordLoss, TraceIncomplete)

    @classmethod
    def check_options(cls, options: ProfileFilesOptions) -> None:
        try:
            parse_errno(options.errno)
        except ValueError as exc:
            raise OptionError(str(exc), "errno") from None
        try:
            options.subdirectory.format(name="n", image="i", id="0")
        except (KeyError, IndexError, ValueError) as exc:
            raise OptionError(
                f"invalid template {options.subdirectory!r} ({exc}): use only {{name}}, {{image}} and {{id}}",
                "subdirectory",
            ) from None
        for index, name in enumerate(options.invariants):
            if name not in INVARIANTS:
                raise OptionError(
                    f"unknown safety invariant {name!r}: known invariants are {', '.join(INVARIANTS)}",
                    f"invariants[{index}]",
                )

    async def setup(self) -> None:
        self._settings = compile_settings(self.options)
        directory = self.options.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ComponentError(f"cannot create the profile directory {directory}: {exc.strerror}") from exc
        check_writable(
            directory, "new profiles cannot be written there and earlier ones cannot be moved aside", "directory"
        )
        docker_version = await _docker_version()
        self._builder = ProfileBuilder(source=f"pipeline {self.context.spec.path}", docker_version=docker_version)
        self._directories: dict[str, Path] = {}
        #: Directories this run has written or cleared for writing. Rewrites
        #: within the run, as in watch mode, replace each other.
        self._owned: set[Path] = set()
        self._last_write = time.monotonic()
        self._reported: set[str] = set()
        self._exited: set[str] = set()

    async def write_batch(self, batch: Batch) -> None:
        exited = []
        for event in batch:
            entry = self._builder.add(event)
            if entry is not None and entry.exited and event.container_id not in self._exited:
                self._exited.add(event.container_id)
                exited.append(event.container_id)
        for container_id in exited:
            await self._write(container_id)
        if time.monotonic() - self._last_write >= self.options.write_interval:
            await self._write_changed()

    async def flush(self) -> None:
        self._failed_components = self.context.failed_components
        await self._write_changed(final=True)

    async def _write_changed(self, final: bool = False) -> None:
        self._last_write = time.monotonic()
        for container_id, entry in list(self._builder.containers.items()):
            if entry.dirty or final:
                await self._write(container_id, final=final)

    async def _write(self, container_id: str, final: bool = False) -> None:
        entry = self._builder.containers[container_id]
        entry.dirty = False
        profile = self._builder.profile(container_id)
        failed = getattr(self, "_failed_components", [])
        if final and failed:
            profile.traces[0].mark_incomplete(
                f"the pipeline stopped because {', '.join(failed)} failed, so every phase may miss syscalls"
            )
        directory = self._directory_for(container_id, entry)
        if directory not in self._owned:
            # TODO: when this rename fails during the run (setup found the
            # directory writable), the container's new profile is not written,
            # and only a trace log of the run can restore it with rephase.
            kept = await anyio.to_thread.run_sync(_keep_earlier, directory)
            if kept is not None:
                self.log.info("profile_kept", container=container_id[:12], path=str(directory), moved_to=str(kept))
            self._owned.add(directory)
        try:
            write = functools.partial(write_profile_dir, listener_path=self.options.listener_path)
            written = await anyio.to_thread.run_sync(write, profile, directory, self._settings)
        except OSError as exc:
            raise ComponentError(f"cannot write the profile of container {container_id[:12]} to {directory}: {exc}") from exc
        trace = profile.traces[0]
        self.log.info(
            "profile_written",
            container=container_id[:12],
            name=trace.container_name,
            directory=str(directory),
            **{phase.value: len(profile.phase(phase)) for phase in PHASES},
            complete=profile.complete,
            final=final,
        )
        if final:
            # Periodic rewrites repeat the same warnings, so they are logged once, at the end.
            for warning in written.warnings:
                self.log.info("profile_note", container=container_id[:12], note=warning)
        if final and not profile.complete and container_id not in self._reported:
            self._reported.add(container_id)
            self.context.report_problem(
                ExitCode.INCOMPLETE,
                f"the profile in {directory} is incomplete: " + "; ".join(trace.problems),
            )

    def _directory_for(self, container_id: str, entry: ContainerProfile) -> Path:
        directory = self._directories.get(container_id)
        if directory is not None:
            return directory
        image = entry.trace.image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
        name = self.options.subdirectory.format(
            name=entry.trace.container_name or container_id[:12], image=image or container_id[:12], id=container_id[:12]
        )
        base = _UNSAFE_NAME.sub("_", name).strip("._") or container_id[:12]
        used = set(self._directories.values())
        directory = self.options.directory / base
        if directory in used:
            directory = self.options.directory / f"{base}-{container_id[:12]}"
        self._directories[container_id] = directory
        return directory


def _keep_earlier(directory: Path) -> Path | None:
    """Move a profile that an earlier run left in ``directory`` aside and return where it went, or None when there is none."""
    if not is_profile_dir(directory):
        return None
    return move_aside(directory, _created_time(directory / FILE_NAME))


def _created_time(path: Path) -> float | None:
    """Return the ``created`` time of a profile.json in seconds since the epoch, or None when it cannot be read."""
    try:
        created = json.loads(path.read_text(encoding="utf-8")).get("created")
        moment = datetime.datetime.fromisoformat(created)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


async def _docker_version() -> str:
    """Return the Docker daemon's version for provenance, or an empty string when it cannot be asked."""
    try:
        import aiodocker
    except ImportError:
        return ""
    try:
        with anyio.fail_after(3):
            async with aiodocker.Docker() as docker:
                version = await docker.version()
    except Exception:  # noqa: BLE001 - provenance is optional; any failure means "unknown"
        return ""
    return str(version.get("Version", ""))
