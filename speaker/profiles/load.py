"""Open any profile a user points at: a profile directory, a profile.json, or a seccomp JSON."""

from __future__ import annotations

import json
from pathlib import Path

from speaker.profiles.directory import is_profile_dir, read_profile_dir
from speaker.profiles.docker_json import read_seccomp_json
from speaker.profiles.errors import ProfileError
from speaker.profiles.model import Profile
from speaker.profiles.profile_json import FORMAT, read_profile_json


def load_profile(path: Path | str, *, strict: bool = True) -> Profile:
    """Read the profile at ``path``, detecting its format.

    Accepts a profile directory (profile.json and/or the SPEAKER list files),
    a profile.json, or a Docker/OCI seccomp JSON. ``strict=False`` relaxes the
    checks of seccomp JSON (see ``read_seccomp_json``). Raises ProfileError
    naming the file and line of the first problem, including a complete
    profile with an empty phase.
    """
    path = Path(path)
    if path.is_dir():
        if not is_profile_dir(path):
            raise ProfileError(
                "not a profile directory: it has neither profile.json nor the booting, running and shutdown files",
                path=path,
            )
        profile, _ = read_profile_dir(path)
    elif path.is_file():
        profile = _load_file(path, strict)
    else:
        raise ProfileError("no such file or directory", path=path)
    check_phases(profile, path)
    return profile


def check_phases(profile: Profile, path: Path) -> None:
    """Raise ProfileError when a profile that claims to be complete has an empty phase."""
    empty = profile.empty_phases()
    if empty and profile.complete:
        names = ", ".join(phase.value for phase in empty)
        raise ProfileError(
            f"empty phase ({names}): a complete profile lists syscalls for every phase. "
            "Trace again, or mark the trace incomplete if the phase was not observed",
            path=path,
        )


def _load_file(path: Path, strict: bool) -> Profile:
    try:
        head = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProfileError("not a profile: the file is not UTF-8 text", path=path) from None
    try:
        data = json.loads(head)
    except json.JSONDecodeError as exc:
        if path.name in ("booting", "running", "shutdown"):
            raise ProfileError("this is one phase file: pass the directory that contains it", path=path) from None
        raise ProfileError(f"not a profile: invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        profile, _ = read_profile_json(path)
        return profile
    return read_seccomp_json(path, strict=strict)
