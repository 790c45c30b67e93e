"""Open any profile a user points at: a profile directory, a profile.json, or a seccomp JSON."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from speaker.profiles.directory import is_profile_dir, read_profile_dir
from speaker.profiles.docker_json import read_seccomp_json
from speaker.profiles.errors import NESTED_TOO_DEEPLY, ProfileError
from speaker.profiles.files import os_reason, read_text
from speaker.profiles.model import Profile
from speaker.profiles.profile_json import FORMAT, parse_profile_json

# The kind line of the YAML that ``profile export --format spo`` writes.
_SECCOMP_PROFILE_KIND = re.compile(r"^kind:\s*SeccompProfile\s*$", re.MULTILINE)


def load_profile(path: Path | str, *, strict: bool = True) -> Profile:
    """Read the profile at ``path``, detecting its format.

    Accepts a profile directory (profile.json and/or the SPEAKER list files),
    a profile.json, or a Docker/OCI seccomp JSON. ``strict=False`` relaxes the
    checks of seccomp JSON (see ``read_seccomp_json``). Raises ProfileError
    naming the file and line of the first problem, including a complete
    profile with an empty phase.
    """
    path = Path(path)
    try:
        is_directory = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ProfileError("no such file or directory", path=path) from None
    except OSError as exc:
        raise ProfileError(f"cannot read: {os_reason(exc)}", path=path) from None
    if is_directory:
        if not os.access(path, os.R_OK | os.X_OK):
            raise ProfileError("cannot read the directory: permission denied", path=path)
        if not is_profile_dir(path):
            raise ProfileError(
                "not a profile directory: it has neither profile.json nor the booting, running and shutdown files",
                path=path,
            )
        profile, _ = read_profile_dir(path)
    else:
        profile = _load_file(path, strict)
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
    text = read_text(path, "a profile", missing="no such file or directory")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.name in ("booting", "running", "shutdown"):
            raise ProfileError("this is one phase file: pass the directory that contains it", path=path) from None
        if _SECCOMP_PROFILE_KIND.search(text):
            raise ProfileError(
                "this is a Kubernetes SeccompProfile (YAML), which SPEAKER writes but cannot read: "
                "pass the profile directory or profile.json it was exported from, "
                "or a Docker seccomp JSON (profile export --format docker)",
                path=path,
            ) from None
        raise ProfileError(f"not a profile: invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
    except RecursionError:
        raise ProfileError(NESTED_TOO_DEEPLY, path=path) from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        profile, _ = parse_profile_json(text, path)
        return profile
    return read_seccomp_json(path, strict=strict)
