"""Fixtures for the ebpf tests: bpftrace on the host, and an image that makes syscalls in a loop."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from speaker.bpf.program import BpfUnavailable, check_host
from tests.conftest import PYTHON, ROOT, require_system

HERE = Path(__file__).resolve().parent
LOOP_SOURCE = HERE / "syscall_loop.c"
LOOP_IMAGE = "spk-f-syscall-loop:latest"
_IMAGE_LABEL = "org.speaker.source-sha256"


@pytest.fixture(scope="session")
def bpftrace_ready() -> None:
    """Require what the ebpf source needs: root, x86_64, kernel BTF and bpftrace."""
    try:
        check_host("bpftrace")
    except BpfUnavailable as exc:
        require_system("bpftrace", False, str(exc))


@pytest.fixture(scope="session")
def loop_image(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build an image with only the static syscall_loop program in it, once per source version."""
    digest = hashlib.sha256(LOOP_SOURCE.read_bytes()).hexdigest()[:16]
    found = subprocess.run(
        ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{_IMAGE_LABEL}"}}}}', LOOP_IMAGE],
        capture_output=True,
        text=True,
    )
    if found.returncode == 0 and found.stdout.strip() == digest:
        return LOOP_IMAGE
    require_system("gcc", shutil.which("gcc") is not None, "install build-essential to build the test program")
    work = tmp_path_factory.mktemp("syscall-loop")
    binary = work / "syscall_loop"
    compiled = subprocess.run(
        ["gcc", "-O2", "-static", "-Wall", "-o", str(binary), str(LOOP_SOURCE)], capture_output=True, text=True
    )
    require_system("static linking with gcc", compiled.returncode == 0, compiled.stderr.strip())
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(binary, arcname="syscall_loop")
    subprocess.run(
        ["docker", "import", "-c", f"LABEL {_IMAGE_LABEL}={digest}", "-c", 'ENTRYPOINT ["/syscall_loop"]', str(archive), LOOP_IMAGE],
        check=True,
        capture_output=True,
    )
    return LOOP_IMAGE


def run_loop_container(
    image: str, *args: str, docker_options: tuple[str, ...] = ()
) -> tuple[str, dict[tuple[str, int], int]]:
    """Run syscall_loop in a container until it exits; return its id and the counts it printed."""
    command = ["docker", "run", "-d", "--network", "none", *docker_options]
    container = subprocess.run([*command, image, *args], check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["docker", "wait", container], check=True, capture_output=True, timeout=120)
        logs = subprocess.run(["docker", "logs", container], check=True, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
    printed = {}
    for line in logs.splitlines():
        arch, number, count = line.split()
        printed[(arch, int(number))] = int(count)
    return container, printed


def wait_for_flush(period: float = 0.5) -> None:
    """Sleep until counts made now have left the kernel, ``period`` being the source's period in seconds.

    Counts leave the kernel up to 1.5 periods after the syscall. The final
    print on SIGINT covers the rest too, so this only keeps the container's
    last slot out of a race with the stop.
    """
    time.sleep(1.5 * period + 0.2)


@dataclass
class TraceResult:
    """Exit code, log lines and events of a pipeline with one source and a jsonl sink."""

    exit_code: int
    log: list[dict]
    events: list[dict]
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    #: Syscalls lost by RecordLoss reason; a reason with an unknown count has 0.
    losses: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for event in self.events:
            if event["type"] == "SyscallCounts":
                for key, count in event["counts"]:
                    self.counts[event["container_id"]][(key["arch"], key["nr"])] += count
            elif event["type"] == "RecordLoss":
                self.losses[event["reason"]] += event["count"]

    def log_events(self, name: str) -> list[dict]:
        return [line for line in self.log if line.get("event") == name]


class BackgroundPipeline:
    """``python -m speaker run`` in a subprocess, started and stopped around test actions."""

    def __init__(self, pipeline: Path, output: Path) -> None:
        self.output = output
        self.log: list[dict] = []
        self.process = subprocess.Popen(
            [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": "text", "text": line.rstrip()}
            self.log.append(entry)
            if entry.get("event") == "pipeline_started":
                self._started.set()

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self._reader.join(5)
                raise AssertionError(f"the pipeline did not start: {self.log[-5:]}")

    def stop(self, timeout: float = 60) -> TraceResult:
        if self.process.poll() is None:
            self.process.send_signal(2)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self._reader.join(5)
        events = []
        if self.output.exists():
            events = [json.loads(line) for line in self.output.read_text().splitlines() if line.strip()]
        return TraceResult(exit_code=code, log=self.log, events=events)


def ebpf_pipeline(directory: Path, source: str = "ebpf", **options: object) -> tuple[Path, Path]:
    """Write a pipeline of one source (ebpf unless named) with ``options`` and a jsonl sink.

    Returns the pipeline file and the path of the sink's output.
    """
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / "events.jsonl"
    lines = ["[sources.ebpf]", f"type = {json.dumps(source)}"]
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines += ["", "[sinks.out]", 'type = "jsonl"', 'inputs = ["ebpf"]', f"path = {json.dumps(str(output))}"]
    pipeline = directory / "ebpf.toml"
    pipeline.write_text("\n".join(lines) + "\n")
    return pipeline, output


@pytest.fixture
def background_ebpf(tmp_path: Path) -> Iterator[Callable[..., BackgroundPipeline]]:
    """Start a pipeline of one source with the given options; stop any still running at the end of the test."""
    started: list[BackgroundPipeline] = []

    def start(**options: object) -> BackgroundPipeline:
        pipeline, output = ebpf_pipeline(tmp_path / f"pipeline-{len(started)}", **options)
        running = BackgroundPipeline(pipeline, output)
        started.append(running)
        running.wait_started()
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
