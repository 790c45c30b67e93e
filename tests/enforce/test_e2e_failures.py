"""A container that fails under pipelines/enforce.toml, with real Docker, runc and seccomp.

Each test edits the traced redis profile so that redis fails while booting,
runs the enforce pipeline on it, and checks that the run exits with code 1
and one problem that names the exit, the phase and the violations. The
tracing messages (an incomplete profile, a trace that may end early) must not
appear: the options below turn them off, as an enforce pipeline should.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from speaker.events import PHASES, Phase
from speaker.profiles.directory import read_profile_dir
from speaker.profiles.speaker_lists import format_list
from tests.enforce.test_e2e import (  # noqa: F401 - session fixtures shared with test_e2e
    PREFIX,
    SERVERS,
    enforce_args,
    enforce_runtime,
    read_violations,
    remove_container,
    run_speaker,
    traced,
)

pytestmark = pytest.mark.system

#: Messages of the trace pipeline that must not appear in an enforced run.
TRACE_MESSAGES = ("its profile is marked incomplete", "so its trace may end early")


def edited_lists(profile: Path, directory: Path, drop: str, shutdown_only: bool) -> Path:
    """Write the profile's phase lists without ``drop``, or with ``drop`` in shutdown only, and return the directory."""
    lists, _ = read_profile_dir(profile)
    assert drop in lists.phase(Phase.BOOTING), f"the traced redis profile has no {drop} in booting"
    directory.mkdir(parents=True, exist_ok=True)
    for phase in PHASES:
        names = set(lists.phase(phase)) - {drop}
        if shutdown_only and phase is Phase.SHUTDOWN:
            names.add(drop)
        (directory / phase.value).write_text(format_list(names))
    return directory


def run_failing(
    tmp_path: Path, lists: Path, pipeline: str = "pipelines/enforce.toml"
) -> tuple[int, list[dict], str, str]:
    detector, _, _ = SERVERS["redis"]
    name = f"{PREFIX}fail-{uuid.uuid4().hex[:6]}"
    try:
        args = enforce_args(tmp_path, "redis", lists, detector, name)
        code, log, stderr = run_speaker("run", pipeline, *args, timeout=180)
    finally:
        remove_container(name)
    return code, log, stderr, name


def exit_code_from_docker(log: list[dict]) -> int | None:
    """Return the exit code of Docker's die event, as the docker source logged it."""
    dies = [entry for entry in log if entry.get("event") == "container_event" and entry.get("action") == "die"]
    assert len(dies) == 1, dies
    return dies[0].get("exit_code")


def problems_of(log: list[dict]) -> list[str]:
    return [entry["problem"] for entry in log if entry.get("event") == "pipeline_problem"]


def test_denied_bind_crash_while_booting(traced, tmp_path: Path) -> None:
    # bind in shutdown only: the kernel notifies it, and the supervisor denies
    # it in booting with EPERM, so redis cannot listen and exits with code 1.
    lists = edited_lists(traced("redis"), tmp_path / "lists", "bind", shutdown_only=True)
    code, log, stderr, name = run_failing(tmp_path, lists)

    assert code == 1, stderr[-4000:]
    assert exit_code_from_docker(log) == 1
    violations = read_violations(tmp_path)
    assert [(item["syscall"], item["phase"], item["action"]) for item in violations] == [("bind", "booting", "denied")]
    (problem,) = problems_of(log)
    print(problem)
    assert problem.startswith(
        f"enforce: container {name} exited with code 1 while booting under enforcement; "
        f"1 violation was reported (bind denied in booting); see {tmp_path / 'violations.jsonl'}; last output: "
    )
    for message in TRACE_MESSAGES:
        assert message not in stderr
    # The problem failed the run, so the last lines call it an error.
    assert f"error: {problem}" in stderr.splitlines()


def test_unlisted_listen_kills_with_sigsys(traced, tmp_path: Path) -> None:
    # listen in no list: the filter's default action (kill-process) kills
    # redis with SIGSYS, Docker reports 128 + 31, and no violation names it.
    lists = edited_lists(traced("redis"), tmp_path / "lists", "listen", shutdown_only=False)
    code, log, stderr, name = run_failing(tmp_path, lists)

    assert code == 1, stderr[-4000:]
    assert exit_code_from_docker(log) == 159
    assert read_violations(tmp_path) == []
    (problem,) = problems_of(log)
    print(problem)
    assert problem.startswith(
        f"enforce: container {name} exited with code 159 while booting under enforcement; "
        "a process was killed by SIGSYS because it made a syscall that no phase list allows "
    )
    assert problem.endswith("; no violation was reported")
    for message in TRACE_MESSAGES:
        assert message not in stderr
    # The problem failed the run, so the last lines call it an error.
    assert f"error: {problem}" in stderr.splitlines()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"] == 0
