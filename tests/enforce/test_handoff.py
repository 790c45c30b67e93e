"""The listener socket: root-only directory, peer credentials, and reading runc's message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from speaker.audit.leases import LeaseRegistry
from speaker.launch.seccomp import write_log_profile
from speaker.notify.handoff import HandoffError, ListenerSocket, prepare_directory
from tests.enforce.conftest import TEST_PREFIX

#: The project's virtualenv may not be readable by other users, so the
#: non-root peers run the system interpreter, which only needs the socket module.
SYSTEM_PYTHON = "/usr/bin/python3"

MESSAGE = {
    "ociVersion": "1.0.2-dev",
    "fds": ["seccompFd"],
    "pid": 4242,
    "metadata": "speaker-runtime",
    "state": {"ociVersion": "1.0.2-dev", "id": "abc123", "status": "creating", "pid": 4242, "bundle": "/b"},
}


@pytest.fixture
def listener(is_root: None, socket_dir: Path):
    sock = ListenerSocket(socket_dir / "supervisor.sock")
    sock.open()
    yield sock
    sock.close()


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    return client


def wait_readable(sock: ListenerSocket) -> None:
    import select

    assert select.select([sock.fileno()], [], [], 5)[0], "no connection arrived"


def test_directory_created_root_only(is_root: None, listener: ListenerSocket) -> None:
    info = listener.path.parent.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == 0
    assert stat.S_IMODE(listener.path.stat().st_mode) == 0o600


def test_open_directory_rejected(is_root: None, socket_dir: Path) -> None:
    socket_dir.mkdir(parents=True)
    os.chmod(socket_dir, 0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        prepare_directory(socket_dir)


def test_handoff_receives_fd_and_state(listener: ListenerSocket) -> None:
    read_end, write_end = os.pipe()
    with connect(listener.path) as client:
        socket.send_fds(client, [json.dumps(MESSAGE).encode()], [read_end])
        wait_readable(listener)
        handoff = listener.accept(timeout=2)
    try:
        assert handoff.state.container_id == "abc123"
        assert handoff.state.pid == 4242
        assert handoff.state.status == "creating"
        assert handoff.state.metadata == "speaker-runtime"
        assert handoff.peer_pid == os.getpid()
        # The received fd is the same pipe: what goes in one end comes out of it.
        os.write(write_end, b"x")
        assert os.read(handoff.fd, 1) == b"x"
    finally:
        os.close(handoff.fd)
        os.close(read_end)
        os.close(write_end)


def test_message_in_pieces_is_joined(listener: ListenerSocket) -> None:
    # runc keeps the connection open, so the reader must stop when the JSON
    # parses, not at end of file.
    data = json.dumps(MESSAGE).encode()
    read_end, write_end = os.pipe()
    with connect(listener.path) as client:
        socket.send_fds(client, [data[:50]], [read_end])
        wait_readable(listener)
        client.send(data[50:])
        handoff = listener.accept(timeout=2)
        os.close(handoff.fd)
    os.close(read_end)
    os.close(write_end)
    assert handoff.state.container_id == "abc123"


def test_missing_fd_rejected(listener: ListenerSocket) -> None:
    with connect(listener.path) as client:
        client.send(json.dumps(MESSAGE).encode())
        wait_readable(listener)
        with pytest.raises(HandoffError, match="attached 0 fds but its message names 1"):
            listener.accept(timeout=2)


def test_invalid_state_rejected(listener: ListenerSocket) -> None:
    broken = {**MESSAGE, "state": {**MESSAGE["state"], "id": 7}}
    read_end, write_end = os.pipe()
    with connect(listener.path) as client:
        socket.send_fds(client, [json.dumps(broken).encode()], [read_end])
        wait_readable(listener)
        with pytest.raises(HandoffError, match="'state.id' must be str"):
            listener.accept(timeout=2)
    os.close(read_end)
    os.close(write_end)


def test_silent_peer_times_out(listener: ListenerSocket) -> None:
    with connect(listener.path) as client:
        client.send(b'{"ociVersion": ')
        wait_readable(listener)
        started = time.monotonic()
        with pytest.raises(HandoffError, match="timed out"):
            listener.accept(timeout=0.3)
        assert time.monotonic() - started < 2


def test_non_root_peer_cannot_connect(listener: ListenerSocket) -> None:
    # The directory's mode stops a non-root process before it reaches the socket.
    script = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(listener.path)!r})"
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", script], user=65534, group=65534, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "PermissionError" in result.stderr


@pytest.fixture
def open_listener(is_root: None) -> Iterator[ListenerSocket]:
    """A listener outside /run/speaker, which stays root-only (0700), so that another user can reach its socket."""
    parent = Path(tempfile.mkdtemp(prefix=f"{TEST_PREFIX}peer-", dir="/tmp"))
    os.chmod(parent, 0o755)
    sock = ListenerSocket(parent / "sock" / "supervisor.sock")
    sock.open()
    yield sock
    sock.close()
    shutil.rmtree(parent, ignore_errors=True)


def test_non_root_peer_rejected_by_credentials(open_listener: ListenerSocket) -> None:
    # Even with the directory opened up, SO_PEERCRED rejects the peer.
    listener = open_listener
    os.chmod(listener.path.parent, 0o755)
    os.chmod(listener.path, 0o777)
    script = (
        "import socket, time; s = socket.socket(socket.AF_UNIX); "
        f"s.connect({str(listener.path)!r}); s.send(b'{{}}'); time.sleep(2)"
    )
    peer = subprocess.Popen([SYSTEM_PYTHON, "-c", script], user=65534, group=65534)
    try:
        wait_readable(listener)
        with pytest.raises(HandoffError, match="uid 65534 is not root"):
            listener.accept(timeout=2)
    finally:
        peer.kill()
        peer.wait()


def test_stale_socket_replaced(is_root: None, socket_dir: Path) -> None:
    path = socket_dir / "supervisor.sock"
    first = ListenerSocket(path)
    first.open()
    # Simulate a supervisor that died without removing its socket file.
    first._socket.close()
    first._socket = None
    second = ListenerSocket(path)
    second.open()
    second.close()


def test_live_socket_not_taken_over(listener: ListenerSocket) -> None:
    with pytest.raises(FileExistsError, match="another process listens"):
        ListenerSocket(listener.path).open()


def test_trace_directories_root_only(is_root: None, socket_dir: Path) -> None:
    # A trace creates /run/speaker first (the audit lease and the
    # log-everything profile), and the supervisor later puts its socket
    # there, so the trace must create it root-only too.
    write_log_profile(socket_dir / "profile")
    with LeaseRegistry("spk-test-lease", socket_dir / "leases").locked():
        pass
    for directory in (socket_dir / "profile", socket_dir / "leases"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        prepare_directory(directory)
