"""The message an OCI runtime sends to a seccomp agent with the listener fd.

runc 1.1 (and crun) connect to ``linux.seccomp.listenerPath`` after loading a
filter that has SCMP_ACT_NOTIFY actions, and send one JSON document with the
fd attached by SCM_RIGHTS. The OCI runtime spec (config-linux.md, "The
Container Process State") defines it::

    {"ociVersion": "1.0.2-dev", "fds": ["seccompFd"], "pid": 4422,
     "metadata": "...", "state": {"ociVersion": "1.0.2-dev", "id": "<container id>",
     "status": "creating", "pid": 4422, "bundle": "/run/.../<id>"}}

``fds`` names the attached fds in order. ``pid`` is the process that loaded
the filter: the container's init for ``create``, the new process for
``exec``. ``metadata`` is ``linux.seccomp.listenerMetadata``, a free string.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

SECCOMP_FD_NAME = "seccompFd"


class ProcessStateError(ValueError):
    """A runtime message that is not a valid container process state."""


@dataclasses.dataclass(frozen=True)
class ProcessState:
    """The fields of the runtime's message that the supervisor uses."""

    container_id: str
    #: Host pid of the process that loaded the filter.
    pid: int
    #: Host pid of the container's init process.
    init_pid: int
    #: ``creating`` for the container's init, ``running`` for ``docker exec``.
    status: str
    bundle: str
    metadata: str
    fd_names: tuple[str, ...]
    annotations: Mapping[str, str]

    @property
    def seccomp_fd_index(self) -> int:
        """Return the position of the seccomp listener among the attached fds."""
        return self.fd_names.index(SECCOMP_FD_NAME)


def parse_process_state(data: bytes) -> ProcessState:
    """Parse the runtime's JSON message.

    Raises json.JSONDecodeError when ``data`` is not yet a whole JSON
    document (the caller reads more and tries again), and ProcessStateError
    naming the key when the document is complete but invalid.
    """
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ProcessStateError(f"expected a JSON object, got {type(document).__name__}")
    state = _require(document, "state", dict, "")
    fd_names = _require(document, "fds", list, "")
    if not all(isinstance(name, str) for name in fd_names):
        raise ProcessStateError(f"key 'fds' must be a list of strings, got {fd_names!r}")
    if SECCOMP_FD_NAME not in fd_names:
        raise ProcessStateError(f"key 'fds' does not name {SECCOMP_FD_NAME!r}: {fd_names!r}")
    container_id = _require(state, "id", str, "state.")
    if not container_id:
        raise ProcessStateError("key 'state.id' is empty")
    annotations = state.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ProcessStateError(f"key 'state.annotations' must be an object, got {annotations!r}")
    metadata = document.get("metadata", "")
    return ProcessState(
        container_id=container_id,
        pid=_require(document, "pid", int, ""),
        init_pid=_require(state, "pid", int, "state."),
        status=_require(state, "status", str, "state."),
        bundle=str(state.get("bundle", "")),
        metadata=metadata if isinstance(metadata, str) else json.dumps(metadata),
        fd_names=tuple(fd_names),
        annotations={str(key): str(value) for key, value in annotations.items()},
    )


def _require(document: Mapping[str, Any], key: str, kind: type, prefix: str) -> Any:
    if key not in document:
        raise ProcessStateError(f"missing key '{prefix}{key}'")
    value = document[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProcessStateError(f"key '{prefix}{key}' must be {kind.__name__}, got {value!r}")
    return value
