"""A profile directory: everything SPEAKER writes for one traced container.

::

    booting, running, shutdown      the SPEAKER list files
    profile.json                    names, numbers, counts and provenance
    docker-booting.json             Docker seccomp profile of each non-empty phase
    docker-running.json
    docker-shutdown.json
    docker-union.json               all phases together, for a whole life
    docker-notify.json              the notify layout, when a listener path is set

When a directory has both profile.json and list files and a user edited a
list file, the list files win: their names replace profile.json's for that
phase, and the profile's notes record the edit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from speaker.compile.arches import home_arch
from speaker.compile.plan import CompileSettings, EmptyPhase, Layout, plan_layout
from speaker.events import PHASES, Phase
from speaker.profiles.docker_json import plan_to_json, write_json
from speaker.profiles.errors import ProfileError
from speaker.profiles.files import exists
from speaker.profiles.model import Profile
from speaker.profiles.profile_json import FILE_NAME, FilterRecord, read_profile_json, write_profile_json
from speaker.profiles.speaker_lists import list_file, read_list_file, read_lists_dir, write_lists_dir

UNION_FILE = "docker-union.json"
NOTIFY_FILE = "docker-notify.json"


def docker_file(phase: Phase) -> str:
    """Return the file name of a phase's Docker seccomp profile, such as ``docker-booting.json``."""
    return f"docker-{phase.value}.json"


@dataclasses.dataclass
class WrittenProfile:
    """Files written by ``write_profile_dir``, with the warnings to show people."""

    directory: Path
    files: list[Path]
    warnings: list[str]


def write_profile_dir(
    profile: Profile,
    directory: Path,
    settings: CompileSettings | None = None,
    *,
    listener_path: str = "",
) -> WrittenProfile:
    """Write the lists, profile.json and the Docker profiles of ``profile`` into ``directory``.

    A phase without syscalls gets an empty list file and no Docker profile,
    because such a profile would stop the container at its first syscall.
    """
    settings = settings or CompileSettings()
    directory.mkdir(parents=True, exist_ok=True)
    files = write_lists_dir(profile, directory)
    warnings: list[str] = []
    written: dict[str, str] = {}
    invariants: dict[str, str] = {}
    lists = profile.lists()
    targets: list[tuple[str, Layout, Phase | None, str]] = [
        (phase.value, Layout.PHASE, phase, docker_file(phase)) for phase in PHASES
    ]
    targets.append(("union", Layout.UNION, None, UNION_FILE))
    if listener_path:
        targets.append(("notify", Layout.NOTIFY, None, NOTIFY_FILE))
    for key, layout, phase, file_name in targets:
        try:
            plan = plan_layout(lists, layout, settings, phase)
        except EmptyPhase as exc:
            warnings.append(f"{file_name} not written: {exc}")
            _remove_stale(directory / file_name)
            continue
        document = plan_to_json(plan, listener_path=listener_path)
        warnings.extend(f"{file_name}: {warning}" for warning in document.warnings)
        write_json(document, directory / file_name)
        files.append(directory / file_name)
        written[key] = file_name
        invariants.update({name: str(action) for name, action in plan.invariants.items()})
    record = FilterRecord(
        default_action=str(settings.default_action),
        arch_lists=settings.arch_lists,
        invariants=dict(sorted(invariants.items())),
        files=written,
    )
    write_profile_json(profile, directory / FILE_NAME, record)
    files.append(directory / FILE_NAME)
    return WrittenProfile(directory, files, warnings)


def _remove_stale(path: Path) -> None:
    # A Docker profile left from an earlier write would no longer match the lists.
    path.unlink(missing_ok=True)


def is_profile_dir(path: Path) -> bool:
    return path.is_dir() and (exists(path / FILE_NAME) or any(exists(list_file(path, phase)) for phase in PHASES))


def read_profile_dir(directory: Path) -> tuple[Profile, FilterRecord | None]:
    """Read a profile directory, preferring profile.json and honoring edits to the list files.

    Raises ProfileError naming the file and line of the first problem.
    """
    json_path = directory / FILE_NAME
    if not exists(json_path):
        if not any(exists(list_file(directory, phase)) for phase in PHASES):
            raise ProfileError(
                "not a profile directory: it has neither profile.json nor the booting, running and shutdown files",
                path=directory,
            )
        return read_lists_dir(directory), None
    profile, record = read_profile_json(json_path)
    unobserved = frozenset(phase for phase in PHASES if not profile.phase(phase)) if not profile.complete else frozenset()
    for phase in PHASES:
        path = list_file(directory, phase)
        if not exists(path):
            continue
        listed = set(read_list_file(path, allow_empty=phase in unobserved or not profile.phase(phase)))
        current = set(profile.phase(phase))
        if listed == current:
            continue
        _apply_edit(profile, phase, listed, current)
        added, removed = sorted(listed - current), sorted(current - listed)
        profile.notes.append(
            f"{path.name} was edited after profile.json was written: "
            f"added {', '.join(added) or 'nothing'}; removed {', '.join(removed) or 'nothing'}"
        )
    return profile, record


def _apply_edit(profile: Profile, phase: Phase, listed: set[str], current: set[str]) -> None:
    for arch, phases in profile.syscalls.items():
        removed = phases[phase] - listed
        phases[phase] -= removed
        for name in removed:
            profile.counts.get(arch, {}).get(phase, {}).pop(name, None)
    for name in listed - current:
        arch = home_arch(name)
        assert arch is not None, "read_list_file only returns names libseccomp knows"
        profile.add(arch, phase, name)
