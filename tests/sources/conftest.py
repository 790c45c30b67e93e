"""Fixtures for the source tests: test programs, auditd, a private dockerd, and pipeline runs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, require_system
from tests.sources.audit_reference import AUDIT_DATA

#: Prefix of everything these tests create (containers, images, directories).
PREFIX = "spk-g-"
LOG_PROFILE = '{"defaultAction":"SCMP_ACT_LOG","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"]}'


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    """A directory that containers can bind-mount (pytest's tmp_path is private to root's tmp)."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX + "tests-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def programs(work_dir: Path) -> dict[str, Path]:
    """Build the storm (x86_64) and i386 test programs from tests/data/audit/src."""
    for tool in ("gcc", "as", "ld"):
        require_system(tool, shutil.which(tool) is not None, "install build-essential")
    storm = work_dir / "storm"
    steps = [
        ["gcc", "-O2", "-static", "-o", str(storm), str(AUDIT_DATA / "src" / "storm.c")],
        ["as", "--32", "-o", str(work_dir / "i386.o"), str(AUDIT_DATA / "src" / "i386.s")],
        ["ld", "-m", "elf_i386", "-static", "-o", str(work_dir / "i386"), str(work_dir / "i386.o")],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        require_system("a static build with " + step[0], result.returncode == 0, result.stderr.strip())
    profile = work_dir / "log.json"
    profile.write_text(LOG_PROFILE)
    return {"storm": storm, "i386": work_dir / "i386", "profile": profile}


def _running_auditd() -> int | None:
    result = subprocess.run(["pgrep", "-x", "auditd"], capture_output=True, text=True)
    pids = [int(pid) for pid in result.stdout.split()]
    return pids[0] if pids else None


def _log_file_of(pid: int) -> Path:
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    config = Path("/etc/audit/auditd.conf")
    if b"-c" in arguments:
        config = Path(arguments[arguments.index(b"-c") + 1].decode()) / "auditd.conf"
    for line in config.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "log_file":
            return Path(value.strip())
    return Path("/var/log/audit/audit.log")


@dataclasses.dataclass
class Auditd:
    pid: int
    log: Path


@pytest.fixture(scope="session")
def auditd(is_root: None) -> Iterator[Auditd]:
    """The running auditd, or a private one with its own configuration and log while the tests run."""
    require_system("auditd", shutil.which("auditd") is not None, "install auditd")
    pid = _running_auditd()
    if pid is not None:
        yield Auditd(pid=pid, log=_log_file_of(pid))
        return

    before = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
    enabled = next((line.split()[1] for line in before.splitlines() if line.startswith("enabled")), "0")
    directory = Path(tempfile.mkdtemp(prefix=PREFIX + "auditd-"))
    (directory / "log").mkdir()
    (directory / "plugins.d").mkdir()
    (directory / "auditd.conf").write_text(
        f"log_file = {directory}/log/audit.log\nlog_format = ENRICHED\nlog_group = root\nwrite_logs = yes\n"
        "flush = INCREMENTAL_ASYNC\nfreq = 50\nmax_log_file = 8\nnum_logs = 5\nmax_log_file_action = ROTATE\n"
        "space_left = 2\nspace_left_action = IGNORE\nadmin_space_left = 1\nadmin_space_left_action = IGNORE\n"
        f"disk_full_action = IGNORE\ndisk_error_action = IGNORE\nplugin_dir = {directory}/plugins.d\n"
    )

    subprocess.run(["auditd", "-c", str(directory)], check=True)
    log = directory / "log" / "audit.log"
    deadline = time.monotonic() + 10
    while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = _running_auditd()
    require_system("auditd", pid is not None and log.exists(), "auditd did not start")
    assert pid is not None
    try:
        yield Auditd(pid=pid, log=log)
    finally:
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline + 20:
            time.sleep(0.1)
        subprocess.run(["auditctl", "-e", enabled], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@dataclasses.dataclass
class PrivateDockerd:
    """A second dockerd with its own socket, data, state and configuration."""

    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def docker(self, *arguments: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", self.host, *arguments], capture_output=True, text=True, **kwargs)

    def start(self) -> None:
        log = open(self.root / "dockerd.log", "ab")
        self.process = subprocess.Popen(
            [
                "dockerd",
                "-H", self.host,
                "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"),
                "--config-file", str(self.root / "daemon.json"),
                "--bridge", "none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--shutdown-timeout", "2",
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 60
        while self.docker("info").returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the private dockerd did not start; see " + str(self.root / "dockerd.log"))
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.process = None

    def restart(self) -> None:
        """Stop the daemon the way systemctl restart does (its containers are stopped), then start it again."""
        self.stop()
        self.start()


class UnixProxy:
    """Forward connections from one unix socket to another, and cut them all on ``stop``.

    It lets a test break a client's connection to dockerd while dockerd keeps running.
    """

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self._server: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.listen.unlink(missing_ok=True)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.listen))
        self._server.listen(16)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.listen.unlink(missing_ok=True)
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self._connections.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, destination: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                destination.sendall(data)
        except OSError:
            pass
        try:
            destination.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture(scope="session")
def private_dockerd(is_root: None, docker_ready: None) -> Iterator[PrivateDockerd]:
    """A private dockerd with a one-file busybox image, spk-g-busybox."""
    busybox = shutil.which("busybox")
    require_system("busybox", busybox is not None, "install busybox-static")
    root = Path(tempfile.mkdtemp(prefix=PREFIX + "dockerd-"))
    (root / "daemon.json").write_text("{}")
    daemon = PrivateDockerd(root)
    try:
        daemon.start()
        image = root / "image"
        image.mkdir()
        shutil.copy(busybox, image / "busybox")
        tar = subprocess.run(["tar", "-C", str(image), "-c", "busybox"], capture_output=True, check=True).stdout
        result = subprocess.run(
            ["docker", "-H", daemon.host, "import", "-c", 'CMD ["/busybox", "sleep", "1000"]', "-", PREFIX + "busybox"],
            input=tar,
            capture_output=True,
        )
        assert result.returncode == 0, result.stderr.decode()
        yield daemon
    finally:
        if daemon.process is not None:
            for name in daemon.docker("ps", "-aq").stdout.split():
                daemon.docker("rm", "-f", name)
        daemon.stop()
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass
class PipelineRun:
    """A ``python -m speaker run`` in a subprocess, with its JSON log lines."""

    process: subprocess.Popen[str]
    stderr_lines: list[str] = dataclasses.field(default_factory=list)

    def wait_for_log(self, event: str, timeout: float = 30.0, **fields: object) -> dict[str, object]:
        """Read log lines until one has ``event`` (and ``fields``); fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                if self.process.poll() is not None:
                    break
                continue
            self.stderr_lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event and all(record.get(key) == value for key, value in fields.items()):
                return record
        raise AssertionError(f"no {event!r} log line within {timeout} s; log:\n" + "".join(self.stderr_lines[-30:]))

    def finish(self, timeout: float = 60.0, interrupt: bool = False) -> int:
        """Wait for the run to end (after SIGINT if ``interrupt``); return its exit code."""
        if interrupt and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        _, rest = self.process.communicate(timeout=timeout)
        self.stderr_lines.extend(rest.splitlines(keepends=True))
        return self.process.returncode

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in self.stderr_lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def start_pipeline(path: Path, *overrides: str, user: str | None = None) -> PipelineRun:
    """Start ``python -m speaker run`` on a pipeline file, logging JSON lines to a pipe."""
    command = [PYTHON, "-m", "speaker", "run", "--log-format", "json", str(path)]
    for override in overrides:
        command += ["--set", override]
    if user is not None:
        command = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *command]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    return PipelineRun(process)


def read_events(path: Path) -> list[dict[str, object]]:
    """Return the events a jsonl sink wrote."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
