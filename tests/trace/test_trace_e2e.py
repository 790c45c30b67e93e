"""End to end: pipelines/trace.toml traces the demo images with real Docker and real audit records.

Each test traces one image through booting, running (a workload) and a
graceful stop. Then it starts the image again under the Docker profiles that
the trace wrote. The booting profile must boot it, and the union profile must
carry it through requests and a graceful stop.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, require_system
from tests.sources.conftest import auditd  # noqa: F401 - a fixture

PIPELINE = ROOT / "pipelines" / "trace.toml"
PGBENCH = "b=$(ls /usr/lib/postgresql/*/bin/pgbench); $b -h 127.0.0.1 -U postgres -i -q postgres && $b -h 127.0.0.1 -U postgres -T 3 postgres"


@dataclasses.dataclass(frozen=True)
class Server:
    image: str
    port: int
    #: Readiness detector, as a TOML inline table.
    detector: str
    #: Output line that shows readiness when the detector is a log pattern, else "".
    ready_line: str
    #: Workload command with {pid}, as the workload stage takes it.
    workload: tuple[str, ...]
    #: A lighter use of the server, run under the union profile. A profile
    #: only allows what the traced workload did, and a repeat of a heavy
    #: workload may take other paths: pgbench's index build, for example,
    #: calls mremap in some runs only.
    check: tuple[str, ...]


SERVERS = {
    "redis": Server(
        "speaker-demo/redis",
        6379,
        '{type="listen", port=6379}',
        "",
        ("nsenter", "-t", "{pid}", "-n", "redis-benchmark", "-h", "127.0.0.1", "-q", "-n", "20000", "-t", "set,get,lpush,lpop"),
        ("nsenter", "-t", "{pid}", "-n", "redis-benchmark", "-h", "127.0.0.1", "-q", "-n", "2000", "-t", "set,get"),
    ),
    "nginx": Server(
        "speaker-demo/nginx",
        80,
        '{type="listen", port=80}',
        "",
        ("nsenter", "-t", "{pid}", "-n", "wrk", "-d", "3s", "-c", "10", "-t", "2", "http://127.0.0.1:80/"),
        ("nsenter", "-t", "{pid}", "-n", "wrk", "-d", "1s", "-c", "2", "-t", "1", "http://127.0.0.1:80/"),
    ),
    "postgres": Server(
        "speaker-demo/postgres",
        5432,
        # Postgres listens before it accepts connections ("the database
        # system is starting up"), so its log line is the readiness signal.
        '{type="log", pattern="database system is ready to accept connections"}',
        "database system is ready to accept connections",
        ("nsenter", "-t", "{pid}", "-n", "-m", "sh", "-c", PGBENCH),
        ("nsenter", "-t", "{pid}", "-n", "-m", "psql", "-h", "127.0.0.1", "-U", "postgres", "-c", "select count(*) from pg_class"),
    ),
}


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def run_trace(server: Server, name: str, out: Path) -> subprocess.CompletedProcess[str]:
    overrides = {
        "sources.docker.launch.image": server.image,
        "sources.docker.launch.name": name,
        "stages.phases.detector": server.detector,
        "stages.workload.command": _toml_list(server.workload),
        "sinks.profiles.directory": str(out / "profiles"),
        "sinks.profiles.subdirectory": "{name}",
        "sinks.trace.path": str(out / "trace.jsonl"),
    }
    arguments = [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(PIPELINE)]
    for key, value in overrides.items():
        arguments += ["--set", f"{key}={value}"]
    return subprocess.run(arguments, capture_output=True, text=True, timeout=300, cwd=out)


def listening(pid: int, port: int) -> bool:
    """Return whether ``port`` is in LISTEN in the network namespace of ``pid``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                return True
    return False


def docker_state(name: str) -> dict:
    result = subprocess.run(["docker", "inspect", "--format", "{{json .State}}", name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ready(name: str, server: Server, pid: int) -> bool:
    """Return whether the container shows the readiness its trace's detector waited for."""
    if server.ready_line:
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        return server.ready_line in logs.stdout + logs.stderr
    return bool(pid) and listening(pid, server.port)


def start_under(profile: Path, server: Server, name: str, *, stay: bool) -> int:
    """Start the image under a seccomp profile, wait until it is ready, and return its init pid.

    With ``stay`` the container must also still run and listen then. Without
    it, the container only has to reach readiness: a booting profile need
    not allow what the server does after that.
    """
    result = subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", "none", "--security-opt", f"seccomp={profile}", server.image],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"docker run under {profile.name} failed: {result.stderr}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = docker_state(name)
        if ready(name, server, state["Pid"]):
            if stay:
                assert state["Running"], f"{server.image} exited under {profile.name}: {state}"
                assert listening(state["Pid"], server.port)
            return int(state["Pid"])
        assert state["Running"], f"{server.image} exited before it was ready under {profile.name}: {state}"
        time.sleep(0.2)
    raise AssertionError(f"{server.image} was not ready under {profile.name} within 30 s")


@pytest.fixture
def cleanup():
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.mark.system
@pytest.mark.parametrize("server_name", list(SERVERS))
def test_trace_demo_image(server_name, demo_images, is_root, tmp_path, cleanup):
    require_system("the kernel audit netlink socket", Path("/proc/self/loginuid").exists(), "CONFIG_AUDIT is off")
    server = SERVERS[server_name]
    suffix = uuid.uuid4().hex[:8]
    traced = f"spk-g-e2e-{server_name}-{suffix}"
    cleanup.append(traced)

    result = run_trace(server, traced, tmp_path)
    assert result.returncode == 0, f"trace failed ({result.returncode}):\n{result.stderr[-4000:]}"

    directory = tmp_path / "profiles" / traced
    profile = json.loads((directory / "profile.json").read_text())
    lists = {phase: set((directory / phase).read_text().split()) for phase in ("booting", "running", "shutdown")}
    for phase, names in lists.items():
        assert names, f"the {phase} list of {server_name} is empty"
    union = lists["booting"] | lists["running"] | lists["shutdown"]
    assert lists["running"] < union
    assert "execve" in lists["booting"]
    assert profile["traces"][0]["complete"] is True, profile["traces"][0].get("problems")
    # The shutdown starts at the kernel's record of runc's kill(2), not at Docker's later event.
    stops = [transition for transition in profile["traces"][0]["transitions"] if transition["phase"] == "shutdown"]
    assert [transition["detector"] for transition in stops] == ["signal"]

    # The booting profile boots the image up to the readiness its trace detected.
    booted = f"spk-g-e2e-boot-{server_name}-{suffix}"
    cleanup.append(booted)
    start_under(directory / "docker-booting.json", server, booted, stay=False)
    subprocess.run(["docker", "rm", "-f", booted], capture_output=True)

    # The union profile carries it through requests and a graceful stop.
    whole = f"spk-g-e2e-union-{server_name}-{suffix}"
    cleanup.append(whole)
    pid = start_under(directory / "docker-union.json", server, whole, stay=True)
    check = [argument.replace("{pid}", str(pid)) for argument in server.check]
    exercised = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert exercised.returncode == 0, f"{shlex.join(check)} failed: {exercised.stderr[-2000:]}"
    assert docker_state(whole)["Running"], f"{server.image} died during {check[4]} under docker-union.json"
    subprocess.run(["docker", "stop", "-t", "10", whole], capture_output=True, check=True)
    state = docker_state(whole)
    assert state["ExitCode"] == 0, f"{server.image} did not stop cleanly under docker-union.json: {state}"


def _trace(tmp_path: Path, name: str, *overrides: str, allow_loss: bool = False) -> subprocess.CompletedProcess[str]:
    arguments = [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(PIPELINE)]
    if allow_loss:
        arguments.append("--allow-loss")
    for override in (
        f"sources.docker.launch.name={name}",
        f"sinks.profiles.directory={tmp_path / 'profiles'}",
        "sinks.profiles.subdirectory={name}",
        f"sinks.trace.path={tmp_path / 'trace.jsonl'}",
        *overrides,
    ):
        arguments += ["--set", override]
    return subprocess.run(arguments, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _log_events(result: subprocess.CompletedProcess[str], event: str) -> list[dict]:
    found = []
    for line in result.stderr.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            found.append(json.loads(line))
    return found


@pytest.mark.system
def test_failing_workload_still_stops(demo_images, is_root, tmp_path, cleanup):
    name = f"spk-g-e2e-fail-{uuid.uuid4().hex[:8]}"
    cleanup.append(name)
    result = _trace(tmp_path, name, """stages.workload.command=["sh", "-c", "echo no such server >&2; exit 3"]""")
    assert result.returncode == 3, result.stderr[-3000:]
    (failure,) = _log_events(result, "workload_failed")
    assert failure["error"] == "sh exited with code 3"
    assert failure["stderr_tail"] == ["no such server"]
    assert "the workload failed (sh exited with code 3; last stderr lines: no such server)" in result.stderr
    # The container was still stopped with Docker's stop, and the audit rule
    # saw runc's kill(2) with the stop signal, which starts the shutdown.
    changes = [(event["phase"], event["detector"]) for event in _log_events(result, "phase_change")]
    assert changes == [("booting", "start"), ("running", "listen"), ("shutdown", "signal")]
    assert [event["exit_code"] for event in _log_events(result, "container_event") if event["action"] == "die"] == [0]


def test_audit_log_source_validates():
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "validate", str(PIPELINE), "--set", "sources.audit.type=audit_log"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.system
def test_trace_with_audit_log_source(demo_images, is_root, auditd, tmp_path, cleanup):  # noqa: F811
    # auditd's log names the record types (SYSCALL, OBJ_PID) that the audit
    # multicast socket numbers, and the stop signal is found in both.
    name = f"spk-g-e2e-log-{uuid.uuid4().hex[:8]}"
    cleanup.append(name)
    result = _trace(tmp_path, name, "sources.audit.type=audit_log", f"sources.audit.path={auditd.log}")
    assert result.returncode == 0, result.stderr[-3000:]
    directory = tmp_path / "profiles" / name
    for phase in ("booting", "running", "shutdown"):
        assert (directory / phase).read_text().split(), f"the {phase} list is empty"
    changes = [(event["phase"], event["detector"]) for event in _log_events(result, "phase_change")]
    assert changes == [("booting", "start"), ("running", "listen"), ("shutdown", "signal")]


@pytest.mark.system
def test_detector_timeout_stops_container(demo_images, is_root, tmp_path, cleanup):
    name = f"spk-g-e2e-timeout-{uuid.uuid4().hex[:8]}"
    cleanup.append(name)
    result = _trace(tmp_path, name, 'stages.phases.detector={type="listen", port=1}', "stages.phases.ready_timeout=3s")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "listen(port=1) did not find the container ready within 3s of its start" in result.stderr
    assert _log_events(result, "workload_skipped")
    profile = json.loads((tmp_path / "profiles" / name / "profile.json").read_text())
    (trace,) = profile["traces"]
    assert trace["complete"] is False
    assert any("did not find the container ready" in problem for problem in trace["problems"])
    changes = [event["phase"] for event in _log_events(result, "phase_change")]
    assert changes == ["booting", "shutdown"]
    assert "execve" in (tmp_path / "profiles" / name / "booting").read_text().split()


@pytest.mark.system
def test_lost_records_mark_incomplete(demo_images, is_root, tmp_path, cleanup):
    # A 4 KiB socket buffer overflows under redis-benchmark, so the kernel
    # drops records for this reader and reports ENOBUFS.
    name = f"spk-g-e2e-loss-{uuid.uuid4().hex[:8]}"
    cleanup.append(name)
    result = _trace(tmp_path, name, "sources.audit.receive_buffer=4096", "sources.audit.max_pending=4096", allow_loss=True)
    assert result.returncode == 0, result.stderr[-3000:]
    profile = json.loads((tmp_path / "profiles" / name / "profile.json").read_text())
    (trace,) = profile["traces"]
    assert trace["complete"] is False
    assert trace["lost"], trace
    assert "records were lost" in result.stderr


@pytest.mark.system
def test_watch_mode_traces_two_containers(demo_images, is_root, tmp_path, cleanup):
    watch = ROOT / "pipelines" / "trace-watch.toml"
    label = f"spk-g-watch-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "speaker.log"
    arguments = [
        PYTHON, "-m", "speaker", "--log-format", "json", "run", str(watch),
        "--set", f"sources.docker.watch_label={label}",
        "--set", 'stages.phases.detector={type="listen", port=6379}',
        "--set", f"sinks.profiles.directory={tmp_path / 'profiles'}",
        "--set", "sinks.profiles.subdirectory={name}",
        "--set", f"sinks.trace.path={tmp_path / 'trace.jsonl'}",
    ]  # fmt: skip
    with log.open("w") as stderr:
        speaker = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while '"watching"' not in log.read_text() and time.monotonic() < deadline:
            assert speaker.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        profile = json.loads(next(line for line in log.read_text().splitlines() if '"watching"' in line))["run_with"]
        seccomp = profile.split("seccomp=", 1)[1].split()[0]
        names = [f"{label}-{index}" for index in (1, 2)]
        cleanup.extend(names)
        for name in names:
            subprocess.run(
                ["docker", "run", "-d", "--name", name, "--network", "none", "--label", f"{label}=1",
                 "--security-opt", f"seccomp={seccomp}", demo_images["redis"]],
                check=True, capture_output=True,
            )  # fmt: skip
        for name in names:
            wait = time.monotonic() + 30
            while time.monotonic() < wait and not listening(docker_state(name)["Pid"], 6379):
                time.sleep(0.2)
        time.sleep(2)
        for name in names:
            subprocess.run(["docker", "stop", "-t", "10", name], check=True, capture_output=True)
        time.sleep(3)
    finally:
        speaker.send_signal(2)
        speaker.wait(timeout=60)
    text = log.read_text()
    assert speaker.returncode == 0, text[-3000:]
    for name in names:
        directory = tmp_path / "profiles" / name
        for phase in ("booting", "running", "shutdown"):
            assert (directory / phase).read_text().split(), f"{name}: empty {phase}\n{text[-3000:]}"
        (trace,) = json.loads((directory / "profile.json").read_text())["traces"]
        assert trace["complete"] is True, trace["problems"]
