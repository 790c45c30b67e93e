"""The docker_events source: launch options, launch and watch mode, and a daemon restart."""

from __future__ import annotations

import calendar
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from speaker.config import ConfigError, load_pipeline
from speaker.launch.create import create_body
from speaker.launch.options import parse_launch
from speaker.launch.seccomp import LOG_PROFILE, ProfileError, security_options
from tests.sources.conftest import PREFIX, UnixProxy, read_events, start_pipeline

PIPELINE = """[sources.docker]
type = "docker_events"
{options}

[sinks.out]
type = "jsonl"
inputs = ["docker"]
path = "{output}"
"""


def write_pipeline(directory: Path, options: str, output: Path) -> Path:
    path = directory / f"{PREFIX}{uuid.uuid4().hex[:8]}.toml"
    path.write_text(PIPELINE.format(options=options, output=output))
    return path


def lifecycle(events: list[dict], container: str | None = None) -> list[tuple[str, dict]]:
    return [
        (event["action"], event)
        for event in events
        if event["type"] == "ContainerEvent" and (container is None or event["container_id"] == container)
    ]


def test_create_body_maps_options():
    options = parse_launch(
        {
            "image": "speaker-demo/nginx",
            "command": ["nginx", "-g", "daemon off;"],
            "env": {"MODE": "test"},
            "ports": ["127.0.0.1:8080:80", "5353:53/udp"],
            "user": "www-data",
            "stop_timeout": 3,
            "stop_signal": "SIGQUIT",
            "cap_add": ["NET_ADMIN"],
            "tmpfs": ["/run:rw,noexec", "/tmp"],
            "read_only": True,
            "healthcheck": {"test": ["CMD", "true"], "interval": "500ms", "retries": 2},
            "host_config": {"ShmSize": 1048576},
        }
    )
    body = create_body(options, security_opt=security_options("log"), labels={"speaker.launch": "x"})

    assert body["Image"] == "speaker-demo/nginx"
    assert body["Cmd"] == ["nginx", "-g", "daemon off;"]
    assert body["Env"] == ["MODE=test"]
    assert body["User"] == "www-data"
    assert body["StopTimeout"] == 3
    assert body["StopSignal"] == "SIGQUIT"
    assert body["Labels"] == {"speaker.launch": "x"}
    assert body["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert body["Healthcheck"] == {
        "Test": ["CMD", "true"],
        "Interval": 500_000_000,
        "Timeout": 5_000_000_000,
        "Retries": 2,
        "StartPeriod": 0,
    }

    host = body["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["PortBindings"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "", "HostPort": "5353"}],
    }
    assert host["CapAdd"] == ["NET_ADMIN"]
    assert host["Tmpfs"] == {"/run": "rw,noexec", "/tmp": ""}
    assert host["ReadonlyRootfs"] is True
    assert host["ShmSize"] == 1048576
    (seccomp,) = host["SecurityOpt"]
    assert json.loads(seccomp.removeprefix("seccomp=")) == LOG_PROFILE


def test_seccomp_choices(tmp_path):
    assert security_options("default") == []
    assert security_options("unconfined") == ["seccomp=unconfined"]
    profile = tmp_path / "enforce.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    assert security_options(str(profile)) == ['seccomp={"defaultAction":"SCMP_ACT_ERRNO","syscalls":[]}']
    with pytest.raises(ProfileError, match=f"cannot read the seccomp profile {tmp_path}/missing.json"):
        security_options(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ProfileError, match="must be a JSON object with a defaultAction key"):
        security_options(str(tmp_path / "list.json"))


def test_launch_override_errors_name_key(tmp_path):
    path = write_pipeline(tmp_path, 'launch = { image = "speaker-demo/redis" }', tmp_path / "out.jsonl")
    spec = load_pipeline(path, ["sources.docker.launch.network=host", "sources.docker.launch.stop_timeout=3"])
    assert spec.components["docker"].options.launch["network"] == "host"
    with pytest.raises(ConfigError) as error:
        load_pipeline(path, ['sources.docker.launch.ports=["80:x"]'])
    assert error.value.key == "launch.ports[0]"
    assert "invalid port '80:x'" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_pipeline(path, ["sources.docker.launch.imag=redis"])
    assert "did you mean 'image'?" in str(error.value)
    missing = write_pipeline(tmp_path, 'launch = { name = "x" }', tmp_path / "out.jsonl")
    with pytest.raises(ConfigError) as error:
        load_pipeline(missing)
    assert error.value.key == "launch.image"


def test_exit_while_booting_reported(work_dir, demo_images):
    output = work_dir / f"{PREFIX}exit.jsonl"
    command = '["sh", "-c", "echo starting; echo boom >&2; exit 3"]'
    pipeline = write_pipeline(
        work_dir,
        f'launch = {{ image = "speaker-demo/redis", command = {command} }}\n'
        f'profile_dir = "{work_dir}/profiles"\nsettle = "500ms"',
        output,
    )
    run = start_pipeline(pipeline)
    assert run.finish(timeout=60) == 3
    records = run.log_records()
    problem = next(str(r["problem"]) for r in records if r.get("event") == "pipeline_problem")
    assert "exited by itself with code 3" in problem
    assert "stderr: boom" in problem
    assert "stdout: starting" in problem
    actions = [action for action, _ in lifecycle(read_events(output))]
    assert actions[:2] == ["create", "start"]
    assert "die" in actions
    assert "destroy" in actions
    lines = [(e["stream"], e["line"]) for e in read_events(output) if e["type"] == "ContainerOutput"]
    assert ("stdout", "starting") in lines
    assert ("stderr", "boom") in lines


def test_watch_mode_traces_labeled_container(work_dir, demo_images):
    label = f"{PREFIX}watch-{uuid.uuid4().hex[:8]}"
    output = work_dir / f"{label}.jsonl"
    pipeline = write_pipeline(work_dir, f'watch_label = "{label}"\nprofile_dir = "{work_dir}/profiles"', output)
    run = start_pipeline(pipeline)
    watching = run.wait_for_log("watching")
    expected = f"docker run --label {label}=1 --security-opt seccomp={work_dir}/profiles/trace-log.json IMAGE"
    assert watching["run_with"] == expected

    name = f"{label}-redis"
    started = subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--network", "none", "--label", f"{label}=1",
         "--security-opt", f"seccomp={work_dir}/profiles/trace-log.json", "speaker-demo/redis"],
        capture_output=True, text=True,
    )
    assert started.returncode == 0, started.stderr
    unlabeled = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "speaker-demo/redis", "true"], capture_output=True
    )
    assert unlabeled.returncode == 0
    run.wait_for_log("container_event", action="start")
    subprocess.run(["docker", "stop", "-t", "5", name], capture_output=True, check=True)
    run.wait_for_log("container_event", action="destroy")
    assert run.finish(interrupt=True) == 0

    events = read_events(output)
    ids = {event["container_id"] for _, event in lifecycle(events)}
    assert len(ids) == 1
    actions = [action for action, _ in lifecycle(events)]
    assert actions == ["create", "start", "kill", "die", "stop", "destroy"]
    by_action = dict(lifecycle(events))
    assert by_action["kill"]["signal"] == 15
    assert by_action["start"]["pid"] > 0
    assert by_action["start"]["labels"][label] == "1"


def test_daemon_restart_gives_gap_and_resync(work_dir, private_dockerd):
    label = f"{PREFIX}gap-{uuid.uuid4().hex[:8]}"
    output = work_dir / f"{label}.jsonl"
    proxy = UnixProxy(private_dockerd.root / "proxy.sock", private_dockerd.root / "docker.sock")
    proxy.start()
    pipeline = write_pipeline(
        work_dir,
        f'watch_label = "{label}"\ndocker_host = "unix://{proxy.listen}"\nprofile_dir = "{work_dir}/profiles"\n'
        'reconnect_max = "1s"\noutput = false',
        output,
    )
    run = start_pipeline(pipeline)
    try:
        run.wait_for_log("watching")

        ids = {}
        for name, extra in (("removed", ["--rm"]), ("kept", [])):
            result = private_dockerd.docker(
                "run", "-d", *extra, "--name", f"{label}-{name}", "--label", label, "--network", "none",
                PREFIX + "busybox",
            )
            assert result.returncode == 0, result.stderr
            ids[name] = result.stdout.strip()
            run.wait_for_log("container_event", action="start", container=ids[name][:12])

        # Cut SPEAKER off first, so that it misses the events of the restart.
        proxy.stop()
        run.wait_for_log("docker_events_interrupted")
        private_dockerd.restart()
        assert private_dockerd.docker("inspect", ids["removed"]).returncode != 0
        kept_state = json.loads(private_dockerd.docker("inspect", ids["kept"]).stdout)[0]["State"]
        assert kept_state["Running"] is False

        proxy.start()
        run.wait_for_log("docker_events_resynced")
        assert private_dockerd.docker("rm", ids["kept"]).returncode == 0
        run.wait_for_log("container_event", action="destroy", container=ids["kept"][:12])
        assert run.finish(interrupt=True) == 0
    finally:
        proxy.stop()
        if run.process.poll() is None:
            run.process.kill()

    events = read_events(output)
    gaps = [event for event in events if event["type"] == "ContainerEvent" and event["action"] == "events_gap"]
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap["gap_start"] < gap["wall_time"]
    after_gap = events[events.index(gap) + 1 :]
    assert [action for action, _ in lifecycle(after_gap, ids["removed"])] == ["die", "destroy"]
    kept_after = lifecycle(after_gap, ids["kept"])
    assert [action for action, _ in kept_after] == ["die", "destroy"]
    assert kept_after[0][1]["exit_code"] == kept_state["ExitCode"]
    finished_at = calendar.timegm(time.strptime(kept_state["FinishedAt"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert 0 <= kept_after[0][1]["event_time"] - finished_at < 1


def test_health_status_reported(work_dir, demo_images):
    name = f"{PREFIX}health-{uuid.uuid4().hex[:8]}"
    output = work_dir / f"{name}.jsonl"
    pipeline = write_pipeline(
        work_dir,
        f'launch = {{ image = "speaker-demo/redis", name = "{name}", '
        'healthcheck = { test = ["CMD", "redis-cli", "ping"], interval = "300ms" } }\n'
        f'profile_dir = "{work_dir}/profiles"\nsettle = "200ms"',
        output,
    )
    run = start_pipeline(pipeline)
    healthy = run.wait_for_log("container_event", action="health_status", timeout=60)
    assert healthy["health"] == "healthy"
    subprocess.run(["docker", "stop", name], capture_output=True, check=True)
    assert run.finish(timeout=60) == 0

    events = read_events(output)
    health = [event for action, event in lifecycle(events) if action == "health_status"]
    assert health[0]["health"] == "healthy"
    assert health[0]["pid"] > 0
