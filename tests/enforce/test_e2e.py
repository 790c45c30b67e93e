"""Trace a demo server, then run it under pipelines/enforce.toml with real Docker, runc and seccomp.

Each test first traces a server from the audit records of a log-everything
profile. Then it enforces the traced profile through the notify back end of
the enforce stage and the speaker-runtime launcher. A session fixture
registers the launcher with the dockerd: it adds a runtime entry named after
TEST_PREFIX and sends a SIGHUP, never a restart, and it removes no entry.
The kmod back end needs the kernel module, which tests/kmod runs in qemu.
Here a test checks that its union profile starts a container through the
same launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from datetime import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from speaker.compile.actions import ALLOW
from speaker.compile.arches import syscall_table
from speaker.compile.bpf import action_for, parse_program
from speaker.compile.loaded import read_loaded_filters
from speaker.config import load_pipeline
from speaker.events import Phase
from speaker.kmod_backend import KmodBackend
from speaker.profiles.directory import read_profile_dir
from speaker.stages.enforce import kmod_settings
from tests.conftest import PYTHON, ROOT
from tests.enforce.conftest import TEST_PREFIX

pytestmark = pytest.mark.system

#: Container names start with this.
PREFIX = f"{TEST_PREFIX}e2e-"
RUNTIME = f"{TEST_PREFIX}runtime"
SOCKET = Path(f"/run/speaker/{TEST_PREFIX}e2e/supervisor.sock")
LAUNCHER = Path(f"/var/lib/{TEST_PREFIX}runtime/speaker-runtime")
SYSTEM_PYTHON = "/usr/bin/python3"

#: Per image: the readiness detector (TOML), the workload (argument list) and the port.
SERVERS = {
    "redis": (
        '{ type = "listen", port = 6379 }',
        ["nsenter", "-t", "{pid}", "-n", "redis-benchmark", "-q", "-n", "20000", "-t", "set,get"],
        6379,
    ),
    "nginx": (
        '{ type = "listen", port = 80 }',
        ["nsenter", "-t", "{pid}", "-n", "wrk", "-t", "2", "-c", "10", "-d", "3s", "http://127.0.0.1:80/"],
        80,
    ),
    "postgres": (
        '{ type = "listen", port = 5432 }',
        [
            "docker", "exec", "{container}", "psql", "-h", "127.0.0.1", "-c",
            "create table t (x int); insert into t select generate_series(1, 10000); select count(*) from t;",
        ],
        5432,
    ),
}  # fmt: skip

#: Files inside the container: the FIFO that releases FIFO_PERL, and its result.
GO_FIFO = "/tmp/speaker-test-go"
RESULT_FILE = "/tmp/speaker-test-result"
#: A perl program that waits for a line on the FIFO GO_FIFO, makes one
#: syscall (NR and ARGS are filled in) and writes "RESULT ERRNO" to RESULT_FILE.
FIFO_PERL = (
    f'open(my $go, "<", "{GO_FIFO}") or die; my $line = <$go>; '
    "my $r = syscall(NR ARGS); my $e = $! + 0; "
    f'open(my $out, ">", "{RESULT_FILE}") or die; print $out "$r $e\\n"; close $out;'
)
#: A perl program that makes one syscall and prints "RESULT ERRNO".
CALL_PERL = 'my $d = "/"; my $r = syscall(NR ARGS); print "$r ", $! + 0, "\\n";'
#: Syscalls a test may deny, in order of preference, with their x86_64 number
#: and perl arguments. mount is left out: without CAP_SYS_ADMIN, which Docker
#: drops, it fails with EPERM even when seccomp allows it.
DENIABLE = (("chroot", 161, ", $d"), ("setuid", 105, ", 0"), ("getppid", 110, ""), ("umask", 95, ", 18"))


def perl(template: str, nr: int, args: str) -> str:
    return template.replace("NR", str(nr)).replace(" ARGS", args).replace("ARGS", args)


# --- Running pipelines ---------------------------------------------------------


def read_log(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def run_speaker(*args: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "--log-format", "json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, read_log(result.stderr), result.stderr


def trace(out: Path, image: str, detector: str, command: list[str]) -> Path:
    """Trace one life of ``image`` with pipelines/trace.toml and return its profile directory.

    A trace that reports itself incomplete (exit 3: audit records lost or
    left unattributed while the host was busy) gives a profile that may lack
    a syscall the server needs. The enforced run would then fail for a
    reason these tests do not check. Such a trace is taken once more, and
    the first one's problems are printed.
    """
    for attempt in (1, 2):
        code, stderr, profile = trace_once(out / f"attempt-{attempt}", image, detector, command)
        if code != 3:
            break
        problems = [entry["problem"] for entry in read_log(stderr) if entry.get("event") == "pipeline_problem"]
        print(f"trace of {image} was incomplete (attempt {attempt}): {problems}")
    assert code == 0, f"trace of {image} ended with exit {code}: {stderr[-3000:]}"
    return profile


def trace_once(out: Path, image: str, detector: str, command: list[str]) -> tuple[int, str, Path]:
    name = f"{PREFIX}trace-{image}-{uuid.uuid4().hex[:6]}"
    out.mkdir(parents=True, exist_ok=True)
    code, _, stderr = run_speaker(
        "run", "pipelines/trace.toml",
        "--set", f"sources.docker.launch.image=speaker-demo/{image}",
        "--set", f"sources.docker.launch.name={name}",
        "--set", f"sources.docker.profile_dir={out / 'docker'}",
        "--set", f"stages.phases.detector={detector}",
        "--set", f"stages.workload.command={json.dumps(command)}",
        # An idle second before the stop makes the shutdown start from the
        # same state in the trace and in the enforced run.
        "--set", 'stages.workload.duration="1s"',
        "--set", f"sinks.profiles.directory={out / 'profiles'}",
        "--set", "sinks.profiles.subdirectory={name}",
        "--set", f"sinks.trace.path={out / 'trace.jsonl'}",
    )  # fmt: skip
    profile = out / "profiles" / name
    assert (profile / "profile.json").is_file(), f"trace of {image} wrote no profile (exit {code}): {stderr[-3000:]}"
    return code, stderr, profile


def enforce_args(out: Path, image: str, profile: Path, detector: str, name: str) -> list[str]:
    """Return the command line that runs pipelines/enforce.toml on ``image`` with ``profile``."""
    seccomp = out / "docker-notify.json"
    return [
        "--set", f"sources.docker.launch.image=speaker-demo/{image}",
        "--set", f"sources.docker.launch.name={name}",
        "--set", f"sources.docker.launch.runtime={RUNTIME}",
        "--set", f"sources.docker.launch.seccomp={seccomp}",
        "--set", f"stages.phases.detector={detector}",
        "--set", f"stages.enforce.profile={profile}",
        "--set", f"stages.enforce.socket={SOCKET}",
        "--set", f"stages.enforce.seccomp_json={seccomp}",
        "--set", f"sinks.violations.path={out / 'violations.jsonl'}",
        "--set", f"sinks.violations.summary={out / 'summary.json'}",
    ]  # fmt: skip


def enforce_with_workload(out: Path, command: list[str]) -> Path:
    """Write enforce.toml plus a workload stage (which stops the container) before the enforce stage."""
    text = (ROOT / "pipelines" / "enforce.toml").read_text()
    stage = '[stages.enforce]\ntype = "enforce"\ninputs = ["phases"]\n'
    assert stage in text, "pipelines/enforce.toml no longer has the enforce stage this test edits"
    text = text.replace(stage, stage.replace('["phases"]', '["workload"]'))
    text += f'\n[stages.workload]\ntype = "workload"\ninputs = ["phases"]\ncommand = {json.dumps(command)}\nduration = "1s"\n'
    pipeline = out / "enforce.toml"
    out.mkdir(parents=True, exist_ok=True)
    pipeline.write_text(text)
    return pipeline


class Background:
    """A pipeline run in the background, with its JSON log collected as it is written."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "w")  # noqa: SIM115 - closed in finish
        self.process = subprocess.Popen(
            [PYTHON, "-m", "speaker", "--log-format", "json", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self.log_file,
        )

    def events(self) -> list[dict]:
        return read_log(self.log_path.read_text())

    def wait_for(self, event: str, timeout: float = 60, **fields: object) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.events():
                if entry.get("event") == event and all(entry.get(key) == value for key, value in fields.items()):
                    return entry
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {event} {fields} in the log: {self.log_path.read_text()[-3000:]}")

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.log_file.close()


def container_pid(name: str) -> int:
    result = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True)
    return int(result.stdout.strip() or 0)


def docker_exec(name: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", name, *command], capture_output=True, text=True, timeout=timeout)


def remove_container(name: str) -> None:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def read_violations(out: Path) -> list[dict]:
    path = out / "violations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_stopped(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = set()
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as file:
                states.add(file.read().rsplit(")", 1)[1].split()[0])
        if states <= {"T", "t"}:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not stop")


def booting_only(profile: Path) -> tuple[str, int, str]:
    """Return the first DENIABLE syscall that the profile allows in booting but not in running."""
    lists, _ = read_profile_dir(profile)
    booting, running = lists.phase(Phase.BOOTING), lists.phase(Phase.RUNNING)
    for name, nr, args in DENIABLE:
        if name in booting and name not in running:
            return name, nr, args
    raise AssertionError(f"none of {[item[0] for item in DENIABLE]} is booting-only in {profile}")


# --- Fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def enforce_runtime(docker_ready: None, demo_images: dict[str, str], is_root: None) -> str:
    """Register the speaker-runtime launcher for SOCKET with the shared dockerd."""
    code, _, stderr = run_speaker(
        "install-runtime", "--name", RUNTIME, "--socket", str(SOCKET), "--launcher-path", str(LAUNCHER), "--reload"
    )
    assert code == 0, stderr
    return RUNTIME


@pytest.fixture(scope="session")
def traced(enforce_runtime: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Return a function that traces a server once per session and returns its profile directory."""
    cache: dict[str, Path] = {}

    def get(image: str) -> Path:
        if image not in cache:
            detector, command, _ = SERVERS[image]
            cache[image] = trace(tmp_path_factory.mktemp(f"trace-{image}"), image, detector, command)
        return cache[image]

    yield get


@pytest.fixture(scope="session")
def redis_with_exec(enforce_runtime: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A redis profile whose running phase includes a docker exec of perl reading a FIFO.

    The detector waits 6 s, so that tests can act during booting. The
    workload's perl makes getpid, which every phase allows, so the tests'
    own syscall stays booting-only.
    """
    name_file = "/proc/{pid}/root" + GO_FIFO
    workload = [
        "sh", "-c",
        f"echo go > {name_file} && docker exec {{container}} perl -e '{perl(FIFO_PERL, 39, '')}' && "
        f"docker exec {{container}} perl -e '{perl(CALL_PERL, 39, '')}' && "
        "nsenter -t {pid} -n redis-benchmark -q -n 20000 -t set,get",
    ]  # fmt: skip
    return trace(tmp_path_factory.mktemp("trace-redis-exec"), "redis", '{ type = "delay", after = "6s" }', workload)


# --- Tests -----------------------------------------------------------------------


def test_install_runtime_again_changes_nothing(enforce_runtime: str) -> None:
    # The session fixture registered the launcher already, so a second run
    # finds everything in place and sends dockerd no SIGHUP.
    code, _, output = run_speaker(
        "install-runtime", "--name", RUNTIME, "--socket", str(SOCKET), "--launcher-path", str(LAUNCHER), "--reload"
    )
    assert code == 0, output
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "install-runtime", "--name", RUNTIME, "--socket", str(SOCKET),
         "--launcher-path", str(LAUNCHER), "--reload"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{LAUNCHER} is up to date" in result.stdout
    assert "already registers runtime" in result.stdout
    assert "no reload needed" in result.stdout


@pytest.mark.parametrize("image", ["redis", "nginx", "postgres"])
def test_clean_life_has_no_violations(traced, image: str, tmp_path: Path) -> None:
    profile = traced(image)
    detector, command, _ = SERVERS[image]
    name = f"{PREFIX}{image}-{uuid.uuid4().hex[:6]}"
    pipeline = enforce_with_workload(tmp_path, command)
    try:
        code, log, stderr = run_speaker("run", str(pipeline), *enforce_args(tmp_path, image, profile, detector, name))
    finally:
        remove_container(name)
    assert code == 0, f"violations: {read_violations(tmp_path)}\n{stderr[-4000:]}"
    assert read_violations(tmp_path) == []
    short_id = next(entry["container"] for entry in log if entry.get("event") == "container_started")
    changes = [entry for entry in log if entry.get("event") == "phase_change" and entry["container"] == short_id]
    assert [entry["phase"] for entry in changes] == ["booting", "running", "shutdown"]
    assert [entry["detector"] for entry in changes] == ["start", "listen", "kill"]
    assert all(entry["reason"] for entry in changes)
    enforced = [entry["phase"] for entry in log if entry.get("event") == "phase_enforced"]
    assert enforced == ["running", "shutdown"]
    # enforce.toml sets the phase machine's lag to 0s, so the shutdown list
    # applies as soon as Docker's kill event arrives (with the tracing
    # default of 1s, it came 1 s later).
    kill = next(entry for entry in log if entry.get("event") == "container_event" and entry.get("action") == "kill")
    shutdown = next(entry for entry in log if entry.get("event") == "phase_enforced" and entry["phase"] == "shutdown")
    delay = datetime.fromisoformat(shutdown["timestamp"]) - datetime.fromisoformat(kill["timestamp"])
    assert delay.total_seconds() < 0.8
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"] == 0


def test_exec_denied_in_running_only(redis_with_exec: Path, tmp_path: Path) -> None:
    syscall, nr, args = booting_only(redis_with_exec)
    name = f"{PREFIX}deny-{uuid.uuid4().hex[:6]}"
    run = Background(
        ["run", "pipelines/enforce.toml",
         *enforce_args(tmp_path, "redis", redis_with_exec, '{ type = "delay", after = "6s" }', name)],
        tmp_path / "log.jsonl",
    )  # fmt: skip
    try:
        run.wait_for("container_started")
        booting = docker_exec(name, "perl", "-e", perl(CALL_PERL, nr, args))
        assert not [entry for entry in run.events() if entry.get("event") == "phase_enforced"], "left booting too early"
        run.wait_for("phase_enforced", phase="running")
        running = docker_exec(name, "perl", "-e", perl(CALL_PERL, nr, args))
        subprocess.run(["docker", "stop", name], capture_output=True, timeout=60)
        assert run.finish() == 0
    finally:
        remove_container(name)
        run.finish()
    assert booting.returncode == 0, booting.stderr
    assert booting.stdout.split()[1] == "0"
    assert running.stdout.split() == ["-1", "1"]
    violations = read_violations(tmp_path)
    assert [(item["syscall"], item["phase"], item["action"], item["comm"]) for item in violations] == [
        (syscall, "running", "denied", "perl")
    ]


def test_exec_runtime_init_judged_as_booting(traced, tmp_path: Path) -> None:
    # Traced without a docker exec, the running list lacks both runc init's
    # setup syscalls (setuid, capset, ...) and a new program's start-up
    # syscalls (arch_prctl, ...). runc's init for docker exec is judged by
    # the booting list, so only perl's start-up is denied.
    profile = traced("redis")
    detector, _, _ = SERVERS["redis"]
    name = f"{PREFIX}init-{uuid.uuid4().hex[:6]}"
    run = Background(["run", "pipelines/enforce.toml", *enforce_args(tmp_path, "redis", profile, detector, name)], tmp_path / "log.jsonl")
    try:
        run.wait_for("phase_enforced", phase="running")
        result = docker_exec(name, "perl", "-e", "1")
        subprocess.run(["docker", "stop", name], capture_output=True, timeout=60)
        run.finish()
    finally:
        remove_container(name)
        run.finish()
    assert result.returncode != 0
    violations = read_violations(tmp_path)
    assert violations, "perl's start-up was not denied"
    assert {item["comm"] for item in violations} == {"perl"}, violations
    lists, _ = read_profile_dir(profile)
    runtime_syscalls = {"setuid", "setgid", "setgroups", "capset"} & (lists.phase(Phase.BOOTING) - lists.phase(Phase.RUNNING))
    assert runtime_syscalls, "the profile has none of runc's setup syscalls as booting-only"
    assert not runtime_syscalls & {item["syscall"] for item in violations}


def start_fifo_perl(name: str, nr: int, args: str, out: Path) -> int:
    """Start the FIFO perl program in the container; return the container's pid for /proc/PID/root."""
    pid = container_pid(name)
    fifo = Path(f"/proc/{pid}/root{GO_FIFO}")
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    started = subprocess.run(["docker", "exec", "-d", name, "perl", "-e", perl(FIFO_PERL, nr, args)], capture_output=True)
    assert started.returncode == 0, started.stderr
    # docker exec -d returns before runc's init has executed perl; the tests
    # stop or kill the supervisor only once perl itself waits on the FIFO.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        top = subprocess.run(["docker", "top", name, "-o", "pid,comm"], capture_output=True, text=True)
        if "perl" in top.stdout.split():
            return pid
        time.sleep(0.1)
    raise AssertionError(f"perl did not start in {name}: {top.stdout} {top.stderr}; violations: {read_violations(out)}")


def trigger_fifo_perl(pid: int, timeout: float = 20) -> list[str]:
    """Release the FIFO perl program and return its "RESULT ERRNO" line, split."""
    result = Path(f"/proc/{pid}/root{RESULT_FILE}")
    result.unlink(missing_ok=True)
    # Opening a FIFO for writing blocks until perl has it open for reading.
    writer = threading.Thread(target=lambda: Path(f"/proc/{pid}/root{GO_FIFO}").write_text("go\n"), daemon=True)
    writer.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result.exists() and result.read_text().endswith("\n"):
            return result.read_text().split()
        time.sleep(0.1)
    raise AssertionError("the perl program wrote no result")


def redis_answers(pid: int) -> bool:
    result = subprocess.run(["nsenter", "-t", str(pid), "-n", "redis-cli", "ping"], capture_output=True, text=True)
    return result.stdout.strip() == "PONG"


def test_killed_supervisor_gives_enosys(redis_with_exec: Path, tmp_path: Path) -> None:
    syscall, nr, args = booting_only(redis_with_exec)
    name = f"{PREFIX}kill-{uuid.uuid4().hex[:6]}"
    run = Background(
        ["run", "pipelines/enforce.toml",
         *enforce_args(tmp_path, "redis", redis_with_exec, '{ type = "delay", after = "6s" }', name)],
        tmp_path / "log.jsonl",
    )  # fmt: skip
    try:
        watchdog = run.wait_for("supervisor_listening")["watchdog_pid"]
        run.wait_for("phase_enforced", phase="running")
        pid = start_fifo_perl(name, nr, args, tmp_path)
        os.kill(run.process.pid, signal.SIGKILL)
        run.finish()
        deadline = time.monotonic() + 10
        while not process_gone(watchdog) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(watchdog), "the watchdog outlived the supervisor"
        # ENOSYS: no listener is left for the filter's notify rules.
        assert trigger_fifo_perl(pid) == ["-1", "38"]
        assert redis_answers(pid)
    finally:
        remove_container(name)
        run.finish()


def test_stalled_supervisor_watchdog_denies(redis_with_exec: Path, tmp_path: Path) -> None:
    syscall, nr, args = booting_only(redis_with_exec)
    name = f"{PREFIX}stall-{uuid.uuid4().hex[:6]}"
    late = f"{PREFIX}late-{uuid.uuid4().hex[:6]}"
    run = Background(
        ["run", "pipelines/enforce.toml",
         *enforce_args(tmp_path, "redis", redis_with_exec, '{ type = "delay", after = "6s" }', name)],
        tmp_path / "log.jsonl",
    )  # fmt: skip
    try:
        run.wait_for("phase_enforced", phase="running")
        pid = start_fifo_perl(name, nr, args, tmp_path)
        os.kill(run.process.pid, signal.SIGSTOP)
        wait_stopped(run.process.pid)
        started = time.monotonic()
        assert trigger_fifo_perl(pid) == ["-1", "1"]
        assert time.monotonic() - started < 10
        # A container started now cannot reach the supervisor; the watchdog
        # accepts its fd and denies runc's setup syscalls, so docker run fails.
        started = time.monotonic()
        late_run = subprocess.run(
            ["docker", "run", "--rm", "--name", late, "--network", "none", "--runtime", RUNTIME,
             "--security-opt", f"seccomp={tmp_path / 'docker-notify.json'}", "speaker-demo/redis", "true"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert late_run.returncode != 0
        assert time.monotonic() - started < 60
        assert redis_answers(pid)
        os.kill(run.process.pid, signal.SIGCONT)
        subprocess.run(["docker", "stop", name], capture_output=True, timeout=60)
        run.finish()
    finally:
        if run.process.poll() is None:
            os.kill(run.process.pid, signal.SIGCONT)
        remove_container(name)
        remove_container(late)
        run.finish()
    responses = [entry for entry in run.events() if entry.get("event") == "watchdog_responded"]
    assert {entry["reason"] for entry in responses} >= {"not_received", "not_accepted"}
    assert all(entry["action"] == "denied" for entry in responses)
    accepted = [entry for entry in run.events() if entry.get("event") == "watchdog_accepted"]
    assert len(accepted) == 1


def test_socket_rejects_non_root(enforce_runtime: str, traced, tmp_path: Path) -> None:
    profile = traced("redis")
    detector, _, _ = SERVERS["redis"]
    name = f"{PREFIX}sock-{uuid.uuid4().hex[:6]}"
    run = Background(["run", "pipelines/enforce.toml", *enforce_args(tmp_path, "redis", profile, detector, name)], tmp_path / "log.jsonl")
    try:
        run.wait_for("supervisor_listening")
        script = f"import socket; socket.socket(socket.AF_UNIX).connect({str(SOCKET)!r})"
        result = subprocess.run([SYSTEM_PYTHON, "-c", script], user=65534, group=65534, capture_output=True, text=True)
        subprocess.run(["docker", "stop", name], capture_output=True, timeout=60)
        run.finish()
    finally:
        remove_container(name)
        run.finish()
    assert result.returncode != 0
    assert "PermissionError" in result.stderr


# --- The kmod back end's union profile through the same launcher --------------------------

#: Directories where Docker 20.10's containerd keeps a container's OCI bundle (with its own or the system containerd).
BUNDLE_ROOTS = (
    Path("/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby"),
    Path("/run/containerd/io.containerd.runtime.v2.task/moby"),
)


def kmod_union_profile(profile: Path, seccomp: Path) -> frozenset[str]:
    """Write the union profile that the enforce stage writes with backend "kmod", and return its x86_64 names.

    It goes through the stage's own option handling and compile path; only
    the module's ioctls are left out, because this host cannot load modules.
    """
    spec = load_pipeline(
        ROOT / "pipelines" / "enforce.toml",
        ["stages.enforce.backend=kmod", f"stages.enforce.profile={profile}", f"stages.enforce.seccomp_json={seccomp}"],
    )
    options = spec.components["enforce"].options
    log = structlog.get_logger("speaker").bind(component="test")
    # load_programs reads, compiles and writes without touching the driver, which needs no context before setup.
    backend = KmodBackend("enforce", kmod_settings(options), options, log, context=None)  # type: ignore[arg-type]
    programs = backend.load_programs()
    return programs.union.names_with(ALLOW, "x86_64")


def bundle_config(container_id: str) -> dict:
    for root in BUNDLE_ROOTS:
        path = root / container_id / "config.json"
        if path.exists():
            return json.loads(path.read_text())
    raise AssertionError(f"no OCI bundle for {container_id[:12]} under {', '.join(map(str, BUNDLE_ROOTS))}")


def test_kmod_union_profile_runs_through_launcher(traced, enforce_runtime: str, tmp_path: Path) -> None:
    # The speaker-runtime launcher only edits a config.json with notify
    # rules, so a pipeline keeps runtime = "speaker-runtime" for both back ends.
    profile = traced("redis")
    seccomp = tmp_path / "seccomp.json"
    union = kmod_union_profile(profile, seccomp)
    name = f"{PREFIX}kmod-{uuid.uuid4().hex[:6]}"
    try:
        started = subprocess.run(
            ["docker", "run", "-d", "--name", name, "--network", "none", "--runtime", enforce_runtime,
             "--security-opt", f"seccomp={seccomp}", "speaker-demo/redis"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        container_id = started.stdout.strip()
        pid = container_pid(name)
        deadline = time.monotonic() + 30
        while not redis_answers(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert redis_answers(pid), "redis did not answer under the union profile"

        seccomp_config = bundle_config(container_id)["linux"]["seccomp"]
        assert "listenerPath" not in seccomp_config
        assert all(rule["action"] != "SCMP_ACT_NOTIFY" for rule in seccomp_config["syscalls"])

        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
        assert status["Seccomp"].strip() == "2"
        assert status["Seccomp_filters"].strip() == "1"
        (loaded,) = read_loaded_filters(pid)
        program = parse_program(loaded)
        table = syscall_table("x86_64")
        actions = {name: str(action_for(program, "x86_64", table.number(name))) for name in union}
        assert set(actions.values()) == {"allow"}
        # runc fails syscalls numbered above every listed one with ENOSYS, so
        # the lowest-numbered unlisted syscall shows the default action.
        outside = min(set(table.numbers) - union, key=table.number)
        assert str(action_for(program, "x86_64", table.number(outside))) == "kill-process"

        stopped = subprocess.run(["docker", "stop", name], capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        exit_code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True)
        assert exit_code.stdout.strip() == "0"
    finally:
        remove_container(name)
