"""The classify stage on counts keyed by real pids: a traced container, another container, the host, a gone process."""

from __future__ import annotations

import subprocess
import time
import uuid

import anyio
import pytest

from speaker.engine import ExitCode
from speaker.events import ContainerAction, ContainerEvent, Event, ProcessSample, RecordLoss, SyscallCounts, SyscallKey
from speaker.options import build_options
from speaker.stages.classify import Classify, ClassifyOptions
from tests.conftest import require_system


class Collected:
    """Stands in for the stage's Output and keeps what it sends."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def send(self, event: Event) -> None:
        self.events.append(event)


class Context:
    """Stands in for the PipelineContext and keeps reported problems."""

    spec = None

    def __init__(self) -> None:
        self.problems: list[tuple[ExitCode, str]] = []

    def report_problem(self, code: ExitCode, message: str) -> None:
        self.problems.append((code, message))


@pytest.fixture
def two_containers(demo_images, is_root):
    names = [f"spk-g-classify-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    ids = []
    try:
        for name in names:
            result = subprocess.run(
                ["docker", "run", "-d", "--rm", "--network", "none", "--name", name, demo_images["redis"]],
                capture_output=True,
                text=True,
            )
            require_system("docker run", result.returncode == 0, result.stderr.strip())
            ids.append(result.stdout.strip())
        pids = []
        for name in names:
            inspected = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True)
            pids.append(int(inspected.stdout))
        yield list(zip(ids, pids, strict=True))
    finally:
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def gone_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_classify_routes_by_container(two_containers):
    (traced, traced_pid), (other, other_pid) = two_containers
    host_pid = subprocess.Popen(["sleep", "30"])
    dead = gone_pid()
    context = Context()
    output = Collected()

    async def run() -> Classify:
        options = build_options(ClassifyOptions, {"proc_connector": "off", "hold": "100ms"})
        stage = Classify("classify", options, context)
        await stage.setup()
        await stage.process(ContainerEvent(container_id=traced, action=ContainerAction.START, name="traced"), output)
        now = time.time()
        counts = {
            SyscallKey(traced_pid, "x86_64", 0): 5,
            SyscallKey(traced_pid, "x86_64", 232): 2,
            SyscallKey(other_pid, "x86_64", 0): 7,
            SyscallKey(host_pid.pid, "x86_64", 1): 3,
            SyscallKey(dead, "x86", 3): 4,
        }
        await stage.process(SyscallCounts(start_time=now - 0.01, end_time=now, counts=counts, source="audit"), output)
        # Samples of untraced containers do not pass.
        await stage.process(ProcessSample(container_id=other, tasks=()), output)
        await anyio.sleep(0.2)
        await stage.tick(0.0, output)
        await stage.finish(output)
        return stage

    try:
        stage = anyio.run(run)
    finally:
        host_pid.kill()
        host_pid.wait()

    counts = [event for event in output.events if isinstance(event, SyscallCounts)]
    assert len(counts) == 1
    assert counts[0].container_id == traced
    assert counts[0].source == "audit"
    assert dict(counts[0].counts) == {
        SyscallKey(0, "x86_64", 0, "read"): 5,
        SyscallKey(0, "x86_64", 232, "epoll_wait"): 2,
    }
    assert not [event for event in output.events if isinstance(event, ProcessSample)]
    assert stage.stats["untraced"] == 7
    assert stage.stats["host"] == 3
    (loss,) = [event for event in output.events if isinstance(event, RecordLoss)]
    assert loss.reason == "unattributed"
    assert loss.count == 4
    assert loss.container_id == traced  # the only traced container running then
    assert [code for code, _ in context.problems] == [ExitCode.INCOMPLETE]
    assert "4 syscalls came from processes that exited" in context.problems[0][1]
