"""The path by which the listener fd reaches the supervisor, by Docker version.

Docker 23.0 and later copy ``listenerPath`` and ``listenerMetadata`` from the
``--security-opt seccomp=FILE`` profile into the OCI config, so runc connects
to the supervisor by itself. Docker 20.10 drops both fields, so runc fails
with "listenerPath is not set" unless the ``speaker-runtime`` wrapper adds
them to config.json before ``runc create``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

#: The first Docker release that keeps listenerPath from the profile.
# NOTE: only Docker 20.10 was tested. Moby added the listener fields to its
# seccomp profile types in 2021, after the 20.10 branch, and 23.0 was the next release.
PROFILE_DELIVERY_SINCE = (23, 0)
DEFAULT_RUNTIME_NAME = "speaker-runtime"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """The path that applies to one Docker daemon."""

    docker_version: str
    #: ``profile`` (Docker 23+) or ``runtime_wrapper`` (older).
    path: str
    #: Runtimes registered in the daemon whose path is a speaker-runtime wrapper.
    wrapper_runtimes: tuple[str, ...]

    @property
    def needs_wrapper(self) -> bool:
        return self.path == "runtime_wrapper"


def parse_version(text: str) -> tuple[int, int]:
    """Return (major, minor) from a version such as ``20.10.24+dfsg1``. Raises ValueError."""
    match = re.match(r"v?(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"invalid Docker version {text!r}: expected MAJOR.MINOR[...]")
    return int(match.group(1)), int(match.group(2))


def choose_delivery(version: Mapping[str, Any], info: Mapping[str, Any]) -> Delivery:
    """Decide the delivery path from Docker's ``/version`` and ``/info`` responses."""
    text = str(version.get("Version", ""))
    path = "profile" if parse_version(text) >= PROFILE_DELIVERY_SINCE else "runtime_wrapper"
    runtimes = info.get("Runtimes") or {}
    wrappers = tuple(
        sorted(
            name
            for name, runtime in runtimes.items()
            if isinstance(runtime, Mapping) and "speaker-runtime" in str(runtime.get("path", ""))
        )
    )
    return Delivery(docker_version=text, path=path, wrapper_runtimes=wrappers)
