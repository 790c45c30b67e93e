"""The log-everything seccomp profile, and the ``seccomp`` choice of a launched container.

With ``defaultAction`` SCMP_ACT_LOG, seccomp allows every syscall and the
kernel writes one type=SECCOMP audit record for each, on the three x86 ABIs.
The Docker Engine API takes a profile's JSON text (``seccomp=<JSON>`` in
HostConfig.SecurityOpt), not a file name, so a profile file is read here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: File name of the log-everything profile in the profile directory.
LOG_PROFILE_NAME = "trace-log.json"

LOG_PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_LOG",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [],
}


class ProfileError(ValueError):
    """A seccomp profile file that cannot be read or is not a JSON object."""


def write_log_profile(directory: Path) -> Path:
    """Write the log-everything profile to ``directory`` (replacing it atomically) and return its path."""
    # 0700: /run/speaker also contains the supervisor's socket, which rejects
    # a directory that other users can enter.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / LOG_PROFILE_NAME
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(LOG_PROFILE, indent=2) + "\n")
    temporary.chmod(0o644)
    temporary.replace(path)
    return path


def security_options(choice: str) -> list[str]:
    """Return the HostConfig.SecurityOpt entries for a ``seccomp`` choice.

    ``choice`` is ``log``, ``default``, ``unconfined`` or the path of a
    Docker seccomp profile. Raises ProfileError naming the file.
    """
    if choice == "log":
        return ["seccomp=" + json.dumps(LOG_PROFILE, separators=(",", ":"))]
    if choice == "default":
        return []
    if choice == "unconfined":
        return ["seccomp=unconfined"]
    path = Path(choice)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(
            f"cannot read the seccomp profile {path}: {exc.strerror}. "
            'Give the path of a Docker seccomp JSON file, or "log", "default" or "unconfined"'
        ) from None
    try:
        profile = json.loads(text)
    except ValueError as exc:
        raise ProfileError(f"the seccomp profile {path} is not valid JSON: {exc}") from None
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ProfileError(f"the seccomp profile {path} must be a JSON object with a defaultAction key")
    return ["seccomp=" + json.dumps(profile, separators=(",", ":"))]
