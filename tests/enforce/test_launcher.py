"""The sh launcher from install-runtime and the Python wrapper give runc the same config.json.

Both implementations run the same cases. /bin/echo replaces runc, so each
case also shows the arguments runc would get.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from speaker import runtime_wrapper
from speaker.commands.install_runtime import launcher_script
from tests.conftest import PYTHON, require_system

NOTIFY_SECCOMP = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_NOTIFY"},
    ],
}
PLAIN_SECCOMP = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}


class Implementation:
    def __init__(self, kind: str, directory: Path, socket_path: Path) -> None:
        self.kind = kind
        if kind == "launcher":
            self.command = [str(directory / "launcher")]
            (directory / "launcher").write_text(launcher_script(str(socket_path), "/bin/echo"))
            (directory / "launcher").chmod(0o755)
        else:
            self.command = [
                PYTHON, "-I", "-S", runtime_wrapper.__file__,
                "--speaker-socket", str(socket_path), "--speaker-runc", "/bin/echo",
            ]  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(params=["launcher", "python"])
def implementation(request, tmp_path: Path) -> Implementation:
    # Quotes, a pipe and an ampersand test the escaping for sh, sed and JSON.
    return Implementation(request.param, tmp_path, tmp_path / 'sup"er|vi&sor.sock')


@pytest.fixture
def listening(tmp_path: Path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / 'sup"er|vi&sor.sock'))
    server.listen(1)
    yield tmp_path / 'sup"er|vi&sor.sock'
    server.close()


def write_bundle(tmp_path: Path, seccomp: dict, indent: int | None = None) -> Path:
    """Write config.json compact, as Docker 20.10 does, or indented, as other tools may."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    config = {"ociVersion": "1.0.2-dev", "process": {"env": ["A=\"seccomp\":{"]}, "linux": {"seccomp": seccomp}}
    separators = (",", ":") if indent is None else (",", ": ")
    (bundle / "config.json").write_text(json.dumps(config, separators=separators, indent=indent))
    return bundle


@pytest.mark.parametrize("indent", [None, 2])
def test_notify_profile_gets_listener(
    implementation: Implementation, listening: Path, tmp_path: Path, indent: int | None
) -> None:
    bundle = write_bundle(tmp_path, NOTIFY_SECCOMP, indent)
    args = ["--root", "/r", "--log", str(tmp_path / "log.json"), "--log-format", "json", "create", "--bundle", str(bundle), "id"]
    result = implementation.run(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == args
    config = json.loads((bundle / "config.json").read_text())
    seccomp = config["linux"]["seccomp"]
    assert seccomp["listenerPath"] == str(listening)
    assert seccomp["listenerMetadata"] == "speaker-runtime"
    assert seccomp["syscalls"] == NOTIFY_SECCOMP["syscalls"]
    assert config["process"]["env"] == ['A="seccomp":{']


def test_plain_profile_untouched(implementation: Implementation, listening: Path, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, PLAIN_SECCOMP)
    before = (bundle / "config.json").read_bytes()
    result = implementation.run("create", "--bundle", str(bundle), "id")
    assert result.returncode == 0, result.stderr
    assert (bundle / "config.json").read_bytes() == before


@pytest.mark.parametrize("indent", [None, 2])
def test_existing_listener_kept(
    implementation: Implementation, listening: Path, tmp_path: Path, indent: int | None
) -> None:
    # Indented, the listener is on another line than the seccomp key.
    bundle = write_bundle(tmp_path, {**NOTIFY_SECCOMP, "listenerPath": "/docker23.sock"}, indent)
    before = (bundle / "config.json").read_bytes()
    result = implementation.run("create", "--bundle", str(bundle), "id")
    assert result.returncode == 0, result.stderr
    assert (bundle / "config.json").read_bytes() == before


def test_missing_supervisor_logged_for_docker(implementation: Implementation, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, NOTIFY_SECCOMP)
    log = tmp_path / "log.json"
    result = implementation.run("--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle), "id")
    assert result.returncode == 1
    assert "not listening on" in result.stderr
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error"
    assert entry["msg"] == result.stderr.strip()
    assert "listenerPath" not in (bundle / "config.json").read_text()


def test_other_commands_pass_through(implementation: Implementation, tmp_path: Path) -> None:
    result = implementation.run("--root", "/r", "delete", "--force", "id")
    assert result.returncode == 0
    assert result.stdout.split() == ["--root", "/r", "delete", "--force", "id"]


def test_launcher_reaches_real_runc(tmp_path: Path) -> None:
    runc = shutil.which("runc")
    require_system("runc", runc is not None, "install runc")
    launcher = tmp_path / "launcher"
    launcher.write_text(launcher_script(str(tmp_path / "s.sock"), str(runc)))
    launcher.chmod(0o755)
    result = subprocess.run([str(launcher), "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout == subprocess.run([runc, "--version"], capture_output=True, text=True).stdout
