"""Read the profile that an enforcement back end enforces, and write the seccomp JSON a container starts with.

The notify supervisor and the kmod back end of the ``enforce`` stage both
read a traced profile, give an empty booting or shutdown list the running
list, and write a Docker seccomp profile for the container launch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speaker.compile.actions import Action
from speaker.compile.plan import CompileSettings, EmptyPhase, FilterPlan, PhaseLists
from speaker.errors import ComponentError
from speaker.events import Phase
from speaker.profiles import Profile, ProfileError
from speaker.profiles.directory import read_profile_dir
from speaker.profiles.docker_json import plan_to_json, write_json
from speaker.profiles.profile_json import read_profile_json

#: Phase lists by architecture and phase, with every phase present.
FilledLists = dict[str, dict[Phase, frozenset[str]]]


def compile_settings(default_action: str, errno: str) -> CompileSettings:
    """Return the compile settings of the ``default_action`` and ``errno`` options."""
    action = Action.parse(f"errno:{errno}" if default_action == "errno" else default_action)
    return CompileSettings(default_action=action)


def load_enforced_lists(path: Path, component: str, log: Any) -> FilledLists:
    """Read the profile at ``path`` and return its lists, with empty phases filled by ``fill_empty_phases``.

    Logs ``profile_incomplete`` for a profile from an incomplete trace and
    ``empty_phases_use_running`` for each filled phase. Raises
    ComponentError when the profile cannot be read or its running list is
    empty; ``component`` names the stage in the message.
    """
    try:
        profile = read_profile(path)
    except ProfileError as exc:
        raise ComponentError(
            f"cannot read the profile: {exc}. Trace the container first (pipelines/trace.toml), "
            f"or set stages.{component}.profile to its profile directory"
        ) from exc
    try:
        filled_lists, filled = fill_empty_phases(profile.lists())
    except EmptyPhase as exc:
        raise ComponentError(f"cannot use the profile {path}: {exc}") from exc
    if not profile.complete:
        log.warning("profile_incomplete", profile=str(path), problems=profile.problems)
    if filled:
        log.info(
            "empty_phases_use_running",
            profile=str(path),
            phases=[phase.value for phase in filled],
            reason="the trace put those syscalls into running, so these phases enforce the running list",
        )
    return filled_lists


def write_seccomp_json(plan: FilterPlan, target: Path, log: Any, *, listener_path: str = "", listener_metadata: str = "") -> None:
    """Write ``plan`` as the Docker seccomp profile at ``target``. Raises ComponentError when writing fails."""
    document = plan_to_json(plan, listener_path=listener_path, listener_metadata=listener_metadata)
    for warning in document.warnings:
        log.warning("seccomp_json_warning", path=str(target), warning=warning)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(document, target)
    except OSError as exc:
        raise ComponentError(f"cannot write the seccomp profile {target}: {exc.strerror}") from exc
    log.info("seccomp_json_written", path=str(target), layout=plan.layout.value, listener_path=listener_path or None)


def read_profile(path: Path) -> Profile:
    """Read a profile directory or a profile.json. Raises ProfileError naming the file.

    Unlike ``load_profile``, this accepts a complete profile with an empty
    booting or shutdown list. A trace produces one when the phase was too
    short to have syscalls of its own: a count that straddles a boundary goes
    to running, and a server that exits within one count interval of
    SIGTERM leaves shutdown empty. The notify layout still allows the running
    list in that phase.
    """
    if path.is_dir():
        return read_profile_dir(path)[0]
    if path.is_file():
        return read_profile_json(path)[0]
    raise ProfileError("no such file or directory", path=path)


def fill_empty_phases(lists: PhaseLists) -> tuple[dict[str, dict[Phase, frozenset[str]]], list[Phase]]:
    """Return ``lists`` with each empty booting or shutdown list replaced by the running list, and those phases.

    A trace leaves a phase empty when it was shorter than one count interval:
    a count that straddles a boundary goes to running, so a server that exits
    within about 100 ms of SIGTERM has its whole shutdown in running. The
    notify layout allows the running list in every phase anyway, so there the
    replacement changes nothing. With ``exact``, and in the kmod back end's
    phase programs, it makes the phase allow exactly the running list, where
    the trace put its syscalls. Raises EmptyPhase when the running list
    itself is empty.
    """
    phases = [Phase.BOOTING, Phase.RUNNING, Phase.SHUTDOWN]
    merged = {phase: frozenset().union(*(by_phase.get(phase, ()) for by_phase in lists.values())) for phase in phases}
    if not merged[Phase.RUNNING]:
        raise EmptyPhase("the running list is empty, so the kernel would allow nothing but the safety invariants")
    empty = [phase for phase in phases if not merged[phase]]
    result: dict[str, dict[Phase, frozenset[str]]] = {}
    for arch, by_phase in lists.items():
        running = frozenset(by_phase.get(Phase.RUNNING, ()))
        result[arch] = {phase: frozenset(by_phase.get(phase, ())) for phase in phases}
        for phase in empty:
            result[arch][phase] = running
    return result, empty
