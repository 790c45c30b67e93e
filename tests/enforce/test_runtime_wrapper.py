"""speaker-runtime: argument handling, config.json rewriting, and pass-through to runc."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from speaker import runtime_wrapper
from speaker.runtime_wrapper import add_listener, find_command, option_value, split_options
from tests.conftest import PYTHON, require_system

WRAPPER = Path(runtime_wrapper.__file__)
# The arguments that Docker 20.10.24's shim passed to a registered runtime (runc 1.1.5).
DOCKER_ARGS = [
    "--root", "/var/run/docker/runtime-runc/moby",
    "--log", "B/log.json",
    "--log-format", "json",
    "create", "--bundle", "B", "--pid-file", "B/init.pid", "ID",
]  # fmt: skip
NOTIFY_SECCOMP = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_NOTIFY"},
    ],
}


def run_wrapper(*args: str) -> subprocess.CompletedProcess[str]:
    # -I -S is how the installed launcher runs it: no site packages, no speaker package.
    return subprocess.run([PYTHON, "-I", "-S", str(WRAPPER), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "linux": {"seccomp": NOTIFY_SECCOMP}}))
    return tmp_path


@pytest.fixture
def listening_socket(tmp_path: Path):
    path = tmp_path / "supervisor.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    yield path
    server.close()


def test_docker_arguments_parsed() -> None:
    options, rest = split_options(["--speaker-socket", "/s", "--speaker-runc=/r", *DOCKER_ARGS])
    assert options["socket"] == "/s"
    assert options["runc"] == "/r"
    assert rest == DOCKER_ARGS
    assert find_command(rest) == 6
    assert option_value(rest[7:], "--bundle", "-b") == "B"
    assert option_value(["-b", "X"], "--bundle", "-b") == "X"
    assert option_value(["--bundle=Y"], "--bundle", "-b") == "Y"


def test_unknown_wrapper_option_rejected() -> None:
    result = run_wrapper("--speaker-sockets", "/s", "--version")
    assert result.returncode == 1
    assert "unknown option --speaker-sockets" in result.stderr


def test_listener_added_only_for_notify_rules() -> None:
    config = {"linux": {"seccomp": json.loads(json.dumps(NOTIFY_SECCOMP))}}
    assert add_listener(config, "/run/speaker/supervisor.sock", "m")
    assert config["linux"]["seccomp"]["listenerPath"] == "/run/speaker/supervisor.sock"
    assert config["linux"]["seccomp"]["listenerMetadata"] == "m"
    # A second call keeps the path that is there (Docker 23+ sets it itself).
    assert not add_listener(config, "/other.sock", "m")
    plain = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}}}
    assert not add_listener(plain, "/s", "m")
    assert not add_listener({"linux": {}}, "/s", "m")


def test_create_rewrites_config_and_runs_runc(bundle: Path, listening_socket: Path) -> None:
    # /bin/echo replaces runc to show the arguments it would receive.
    args = [*DOCKER_ARGS[:6], "create", "--bundle", str(bundle), "ID"]
    result = run_wrapper("--speaker-socket", str(listening_socket), "--speaker-runc", "/bin/echo", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == args
    seccomp = json.loads((bundle / "config.json").read_text())["linux"]["seccomp"]
    assert seccomp["listenerPath"] == str(listening_socket)
    assert seccomp["listenerMetadata"] == "speaker-runtime"
    assert seccomp["syscalls"] == NOTIFY_SECCOMP["syscalls"]


def test_create_without_supervisor_fails_in_runc_log(bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    args = ["--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle), "ID"]
    result = run_wrapper("--speaker-socket", str(tmp_path / "missing.sock"), "--speaker-runc", "/bin/echo", *args)
    assert result.returncode == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error"
    assert "not listening on" in entry["msg"]
    assert "listenerPath" not in (bundle / "config.json").read_text()


def test_other_commands_pass_through(bundle: Path) -> None:
    before = (bundle / "config.json").read_bytes()
    result = run_wrapper("--speaker-runc", "/bin/echo", "--root", "/r", "start", "ID")
    assert result.returncode == 0
    assert result.stdout.split() == ["--root", "/r", "start", "ID"]
    assert (bundle / "config.json").read_bytes() == before


def test_real_runc_reached() -> None:
    runc = shutil.which("runc")
    require_system("runc", runc is not None, "install runc")
    result = run_wrapper("--speaker-runc", str(runc), "--version")
    assert result.returncode == 0
    assert result.stdout == subprocess.run([runc, "--version"], capture_output=True, text=True).stdout


def test_json_helpers_match_json_module() -> None:
    document = {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["sh", "-c", "echo \"é\" \\ \t"], "env": ["A=1"], "terminal": False},
        "linux": {"seccomp": NOTIFY_SECCOMP, "resources": {"cpu": {"quota": -1, "shares": 1.5}}, "x": None},
    }
    text = json.dumps(document, indent=1, ensure_ascii=False)
    assert runtime_wrapper._load_json(text) == json.loads(text)
    assert runtime_wrapper._dump_json(document) == json.dumps(document, separators=(",", ":"))
    with pytest.raises(ValueError, match="extra data"):
        runtime_wrapper._load_json('{"a": 1} x')
    with pytest.raises(ValueError):
        runtime_wrapper._load_json('{"a": ')
