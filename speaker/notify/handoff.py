"""The unix socket on which the OCI runtime hands over seccomp listener fds.

The socket lives in a directory that only root can enter, and every
connection is checked again with SO_PEERCRED. A peer that is not uid 0 is
disconnected before anything is read, because the owner of a listener fd
decides which syscalls of that container run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path

from speaker.notify.oci import ProcessState, ProcessStateError, parse_process_state

#: The message runc 1.1.5 sends is about 420 bytes; OCI annotations can make it larger.
MAX_MESSAGE_BYTES = 1 << 20
_MAX_FDS = 16
_UCRED = struct.Struct("iII")


class HandoffError(Exception):
    """A connection that did not deliver a usable listener fd. The message gives the reason."""


@dataclasses.dataclass(frozen=True)
class Handoff:
    """A listener fd received from the runtime, with the container it belongs to."""

    fd: int
    state: ProcessState
    #: Pid of the connecting process (runc), from SO_PEERCRED.
    peer_pid: int


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` with mode 0700, or check that an existing one is root-only.

    Raises PermissionError naming the directory and the fix when it is owned
    by another user or open to group or others.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{directory} is not a directory (a symbolic link?); remove it and start again")
    if info.st_uid != 0:
        raise PermissionError(f"{directory} is owned by uid {info.st_uid}, not root: run `chown root {directory}`")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}, so users other than root can reach the "
            f"supervisor socket: run `chmod 700 {directory}`"
        )


class ListenerSocket:
    """A listening unix stream socket that accepts listener fds from root peers only."""

    def __init__(self, path: Path, backlog: int = 64) -> None:
        self.path = path
        self._socket: socket.socket | None = None
        self._backlog = backlog

    def open(self) -> None:
        """Bind and listen. Replaces a stale socket file, but not one that another process listens on."""
        prepare_directory(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock

    def _remove_stale(self) -> None:
        if not stat.S_ISSOCK(self.path.lstat().st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket; remove it or choose another socket path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            self.path.unlink()
            return
        finally:
            probe.close()
        raise FileExistsError(
            f"another process listens on {self.path}; stop that supervisor or choose another socket path"
        )

    def fileno(self) -> int:
        if self._socket is None:
            raise ValueError("the listener socket is not open")
        return self._socket.fileno()

    def accept(self, timeout: float) -> Handoff:
        """Accept one connection and receive its listener fd and process state.

        Raises BlockingIOError when no connection is waiting, and otherwise
        what ``receive_handoff`` raises.
        """
        if self._socket is None:
            raise ValueError("the listener socket is not open")
        return accept_handoff(self._socket, timeout)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._socket is None:
            return
        self._socket.close()
        self._socket = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def accept_handoff(listening: socket.socket, timeout: float) -> Handoff:
    """Accept one connection on ``listening`` and receive its listener fd and process state.

    Reads until the JSON document parses, because runc keeps the connection
    open until ``runc create`` exits. Raises HandoffError for a rejected peer
    or an invalid message, after closing any fds it got, and BlockingIOError
    when no connection is waiting on a non-blocking socket.
    """
    connection, _ = listening.accept()
    with connection:
        pid, uid, _gid = _UCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:
            raise HandoffError(f"rejected a connection from pid {pid}: uid {uid} is not root")
        connection.settimeout(timeout)
        fds: list[int] = []
        try:
            state = _receive_state(connection, fds, time.monotonic() + timeout, pid)
            fd = fds.pop(state.seccomp_fd_index)
        finally:
            for extra in fds:
                os.close(extra)
    return Handoff(fd=fd, state=state, peer_pid=pid)


def _receive_state(connection: socket.socket, fds: list[int], deadline: float, pid: int) -> ProcessState:
    data = b""
    while True:
        if time.monotonic() > deadline:
            raise HandoffError(f"timed out waiting for the process state from pid {pid}: received {len(data)} bytes")
        try:
            chunk, ancillary, flags, _ = connection.recvmsg(65536, socket.CMSG_SPACE(_MAX_FDS * 4))
        except TimeoutError:
            raise HandoffError(
                f"timed out waiting for the process state from pid {pid}: received {len(data)} bytes"
            ) from None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if flags & socket.MSG_CTRUNC:
            raise HandoffError(f"pid {pid} sent more than {_MAX_FDS} fds; the extra ones were dropped")
        if not chunk:
            raise HandoffError(f"pid {pid} closed the connection after {len(data)} bytes, before a whole JSON document")
        data += chunk
        if len(data) > MAX_MESSAGE_BYTES:
            raise HandoffError(f"the message from pid {pid} exceeds {MAX_MESSAGE_BYTES} bytes")
        try:
            state = parse_process_state(data)
        except json.JSONDecodeError:
            continue
        except ProcessStateError as exc:
            raise HandoffError(f"invalid process state from pid {pid}: {exc}") from None
        if len(fds) != len(state.fd_names):
            raise HandoffError(
                f"pid {pid} attached {len(fds)} fds but its message names {len(state.fd_names)}: {list(state.fd_names)}"
            )
        return state
