"""Docker's default seccomp profile as this host enforces it, for comparing profiles against.

Docker compiles its default profile into dockerd, and no file of it exists on
a Debian host. Instead of copying the JSON from Docker's repository, SPEAKER
starts a container with the default profile, reads the filter that runc
loaded into it (PTRACE_SECCOMP_GET_FILTER) and evaluates that program for
every syscall number libseccomp has a name for. A syscall counts as allowed when the
filter allows it with all arguments zero. The few rules that depend on
argument values (clone flags, personality values) are listed in the notes.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Sequence

from speaker.compile.actions import ALLOW, Action, ActionKind
from speaker.compile.arches import host_arches
from speaker.compile.bpf import Instruction, parse_program, syscall_actions
from speaker.compile.loaded import read_loaded_filters
from speaker.compile.plan import CompileSettings, union_plan
from speaker.events import PHASES
from speaker.profiles.docker_json import SeccompJson, plan_to_json
from speaker.profiles.model import Profile, TraceInfo

_ALL_ONES = (0xFFFFFFFFFFFFFFFF,) * 6


class BaselineError(RuntimeError):
    """The default profile could not be read. The message names the step that failed."""


def docker_default_baseline(image: str, *, container_name: str = "", docker: str = "docker", timeout: float = 60) -> Profile:
    """Start ``image`` under Docker's default profile and return the syscalls that profile allows.

    The container runs with ``--network none`` and is removed afterwards.
    """
    name = container_name or f"speaker-baseline-{uuid.uuid4().hex[:8]}"
    run = _docker(docker, ["run", "-d", "--network", "none", "--name", name, image], timeout)
    try:
        pid_text = _docker(docker, ["inspect", "-f", "{{.State.Pid}}", name], timeout).strip()
        if not pid_text.isdigit() or pid_text == "0":
            raise BaselineError(f"container {name} of {image} is not running (pid {pid_text!r}); check that the image starts")
        filters = read_loaded_filters(int(pid_text))
        version = _docker(docker, ["version", "--format", "{{.Server.Version}}"], timeout).strip()
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=timeout)
    if not filters:
        raise BaselineError(f"container {name} runs without a seccomp filter: is seccomp disabled in dockerd?")
    # Index 0 is the newest filter. The runtime's filter is the oldest one,
    # since the container's own program could only have added filters on top.
    program = parse_program(filters[-1])
    profile = profile_from_program(program)
    profile.traces.append(
        TraceInfo(container_id=run.strip(), container_name=name, image=image, source="docker default profile", docker_version=version)
    )
    profile.notes.insert(
        0,
        f"Docker {version}'s default seccomp profile, read from the filter loaded into a container of {image}",
    )
    return profile


def profile_from_program(program: Sequence[Instruction]) -> Profile:
    """Return the names a loaded program allows with zero arguments, the same for every phase."""
    zero = syscall_actions(program, host_arches())
    ones = syscall_actions(program, host_arches(), args=_ALL_ONES)
    profile = Profile()
    conditional = set()
    for arch, by_name in zero.items():
        for name, action in by_name.items():
            if action == ALLOW:
                for phase in PHASES:
                    profile.add(arch, phase, name)
            if action != ones[arch][name]:
                conditional.add(name)
    if conditional:
        profile.notes.append(
            "allowed or denied depending on argument values (counted as evaluated with zero arguments): "
            + ", ".join(sorted(conditional))
        )
    return profile


def baseline_json(profile: Profile) -> SeccompJson:
    """Return a Docker seccomp profile that allows exactly the baseline's names, with EPERM for the rest."""
    settings = CompileSettings(default_action=Action(ActionKind.ERRNO, 1), invariants=(), arch_lists="observed")
    return plan_to_json(union_plan(profile.lists(), settings))


def _docker(docker: str, arguments: list[str], timeout: float) -> str:
    try:
        result = subprocess.run([docker, *arguments], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BaselineError(f"the {docker} command is not installed") from None
    except subprocess.TimeoutExpired:
        raise BaselineError(f"`{docker} {' '.join(arguments)}` timed out after {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BaselineError(f"`{docker} {' '.join(arguments)}` failed: {result.stderr.strip()}")
    return result.stdout
