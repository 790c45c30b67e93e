"""The enforce stage: option checks per back end, the kmod back end's programs, and its failure without the module.

Kills from the kernel's audit records go through the stage with a back end
that only records its input, because the conversion happens before either
back end sees an event.

The programs are checked by running them with speaker.compile.bpf, the
interpreter of the kernel's classic BPF, not by asking libseccomp. The kmod
back end's ioctls run in the qemu guest (tests/kmod/guest/suite.py,
``enforce_stage_kmod_backend``), because this host cannot load modules.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anyio
import pytest
import structlog
import structlog.testing

from speaker.compile.arches import syscall_table
from speaker.compile.bpf import action_for, parse_program
from speaker.component import Input, Output, Route
from speaker.config import ConfigError, load_pipeline
from speaker.engine import Engine, ExitCode, run_pipeline
from speaker.enforce_profile import compile_settings
from speaker.events import ContainerAction, ContainerEvent, Phase, PhaseChange, SyscallRecord, Violation
from speaker.kmod_backend import DENY_ACTIONS, KmodBackend, KmodSettings, compile_kmod_programs
from speaker.kmod_driver import KmodOptions
from speaker.notify.supervisor import SupervisorOptions
from speaker.options import option_specs
from speaker.profiles import Profile
from speaker.profiles.profile_json import write_profile_json
from speaker.stages.enforce import EnforceOptions, kmod_settings
from tests.conftest import ROOT

#: getpgid is booting-only, getsid shutdown-only, getppid in every phase,
#: and sched_yield in none.
LISTS = {
    Phase.BOOTING: {"getpgid", "getppid"},
    Phase.RUNNING: {"getppid"},
    Phase.SHUTDOWN: {"getsid", "getppid"},
}


def x86_64_actions(bpf: bytes, names: list[str]) -> dict[str, str]:
    """Run ``bpf`` for each x86_64 syscall name and return the action it gives."""
    program = parse_program(bpf)
    table = syscall_table("x86_64")
    return {name: str(action_for(program, "x86_64", table.number(name))) for name in names}


def lists_by_arch() -> dict[str, dict[Phase, frozenset[str]]]:
    return {"x86_64": {phase: frozenset(names) for phase, names in LISTS.items()}}


def write_profile(directory: Path) -> Path:
    path = directory / "profile.json"
    write_profile_json(Profile.from_lists(LISTS, "x86_64"), path)
    return path


# --- Options ----------------------------------------------------------------


def test_options_inherit_both_back_ends() -> None:
    names = [spec.name for spec in option_specs(EnforceOptions)]
    inherited = [spec.name for spec in option_specs(SupervisorOptions)] + [spec.name for spec in option_specs(KmodOptions)]
    assert names == ["backend", *inherited]
    by_name = {spec.name: spec for spec in option_specs(EnforceOptions)}
    for spec in option_specs(SupervisorOptions) + option_specs(KmodOptions):
        assert by_name[spec.name].help == spec.help
        assert by_name[spec.name].default == spec.default


def validate(*overrides: str) -> None:
    load_pipeline(ROOT / "pipelines" / "enforce.toml", overrides)


@pytest.mark.parametrize("pipeline", ["enforce.toml", "enforce-watch.toml", "enforce-audited.toml"])
@pytest.mark.parametrize("backend", ["notify", "kmod"])
def test_pipelines_validate_with_backend(pipeline: str, backend: str) -> None:
    spec = load_pipeline(ROOT / "pipelines" / pipeline, [f"stages.enforce.backend={backend}"])
    assert spec.components["enforce"].options.backend == backend


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("mode", '"complain"', "has no complain mode"),
        ("exact", "true", "always enforces each phase's own list"),
        ("shutdown_grace", '"5s"', "kernel_shutdown switches to shutdown"),
        ("running_grace", '"1s"', "notify-exact layout"),
        ("socket", '"/run/speaker/other.sock"', "runs no supervisor"),
        ("response_timeout", '"3s"', "runs no supervisor"),
        ("max_listeners", "8", "receives no listener fds"),
        ("receive", '"poll"', "receives no notifications"),
    ],
)
def test_kmod_rejects_notify_options(key: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate("stages.enforce.backend=kmod", f"stages.enforce.{key}={value}")
    assert caught.value.key == key
    assert 'applies to backend "notify" only' in caught.value.message
    assert reason in caught.value.message


@pytest.mark.parametrize(("key", "value"), [("device", '"/dev/other"'), ("kernel_shutdown", "false"), ("on_exit", '"keep"'), ("newest_filter", "true")])
def test_notify_rejects_kmod_options(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(f"stages.enforce.{key}={value}")
    assert caught.value.key == key
    assert 'applies to backend "kmod" only' in caught.value.message


def test_kmod_needs_profile() -> None:
    with pytest.raises(ConfigError) as caught:
        validate("stages.enforce.backend=kmod", 'stages.enforce.profile=""', 'stages.enforce.seccomp_json=""')
    assert caught.value.key == "profile"
    assert "use the kmod sink" in caught.value.message


def test_kmod_accepts_shared_options() -> None:
    validate(
        "stages.enforce.backend=kmod",
        'stages.enforce.deny_action="kill"',
        'stages.enforce.default_action="errno"',
        'stages.enforce.errno="EACCES"',
        'stages.enforce.running_margin="1s"',
        'stages.enforce.on_exit="restore"',
    )


# --- Programs of the kmod back end ------------------------------------------------

NAMES = ["getpgid", "getppid", "getsid", "sched_yield", "exit_group", "clone3"]


def test_phase_programs_split_like_notify() -> None:
    settings = compile_settings("kill-process", "EPERM")
    programs = compile_kmod_programs(lists_by_arch(), settings, DENY_ACTIONS["errno"], margin=True)
    expected = {
        Phase.BOOTING: {"getpgid": "allow", "getppid": "allow", "getsid": "errno:EPERM"},
        Phase.RUNNING: {"getpgid": "errno:EPERM", "getppid": "allow", "getsid": "errno:EPERM"},
        Phase.SHUTDOWN: {"getpgid": "errno:EPERM", "getppid": "allow", "getsid": "allow"},
    }
    for phase, listed in expected.items():
        actions = x86_64_actions(programs.phases[phase].bpf, NAMES)
        for name, action in listed.items():
            assert actions[name] == action, f"{phase} {name}"
        assert actions["sched_yield"] == "kill-process", phase
        assert actions["exit_group"] == "allow", phase
        assert actions["clone3"] == "errno:ENOSYS", phase


def test_margin_program_allows_booting_and_running() -> None:
    settings = compile_settings("kill-process", "EPERM")
    programs = compile_kmod_programs(lists_by_arch(), settings, DENY_ACTIONS["errno"], margin=True)
    assert programs.margin is not None
    actions = x86_64_actions(programs.margin.bpf, NAMES)
    assert actions["getpgid"] == "allow"
    assert actions["getppid"] == "allow"
    assert actions["getsid"] == "errno:EPERM"
    assert actions["sched_yield"] == "kill-process"


def test_no_margin_program_without_margin() -> None:
    programs = compile_kmod_programs(lists_by_arch(), compile_settings("kill-process", "EPERM"), DENY_ACTIONS["errno"], margin=False)
    assert programs.margin is None


def test_deny_kill_kills_other_phases() -> None:
    programs = compile_kmod_programs(lists_by_arch(), compile_settings("errno", "EACCES"), DENY_ACTIONS["kill"], margin=False)
    actions = x86_64_actions(programs.phases[Phase.RUNNING].bpf, NAMES)
    assert actions["getpgid"] == "kill-process"
    assert actions["getsid"] == "kill-process"
    assert actions["sched_yield"] == "errno:EACCES"
    assert actions["getppid"] == "allow"


def test_deny_equal_to_default_action() -> None:
    # libseccomp rejects a rule whose action is the default action, and the
    # program must still deny the other phases' syscalls.
    programs = compile_kmod_programs(lists_by_arch(), compile_settings("errno", "EPERM"), DENY_ACTIONS["errno"], margin=False)
    actions = x86_64_actions(programs.phases[Phase.RUNNING].bpf, NAMES)
    assert actions["getpgid"] == "errno:EPERM"
    assert actions["sched_yield"] == "errno:EPERM"
    assert actions["getppid"] == "allow"


def test_union_plan_allows_every_phase() -> None:
    programs = compile_kmod_programs(lists_by_arch(), compile_settings("kill-process", "EPERM"), DENY_ACTIONS["errno"], margin=False)
    assert {"getpgid", "getppid", "getsid"} <= programs.union.allowed
    assert "sched_yield" not in programs.union.allowed
    assert not programs.union.notified


# --- The stage in a pipeline, without the module -------------------------------------


def write_pipeline(directory: Path, *, device: Path) -> Path:
    events = directory / "events.jsonl"
    container = "c0ffee" * 4
    lines = [
        ContainerEvent(container_id=container, action=ContainerAction.START, pid=1, stop_signal=15),
        PhaseChange(container_id=container, phase=Phase.RUNNING, previous=Phase.BOOTING),
    ]
    events.write_text("".join(json.dumps(event.to_dict()) + "\n" for event in lines))
    pipeline = directory / "enforce.toml"
    pipeline.write_text(
        f'[sources.replay]\ntype = "jsonl_replay"\npath = "{events}"\n\n'
        f'[stages.enforce]\ntype = "enforce"\ninputs = ["replay"]\nbackend = "kmod"\n'
        f'profile = "{write_profile(directory)}"\nseccomp_json = "{directory / "seccomp.json"}"\ndevice = "{device}"\n\n'
        f'[sinks.count]\ntype = "count"\ninputs = ["enforce"]\n'
    )
    return pipeline


def test_kmod_backend_without_module_fails_at_setup(tmp_path: Path) -> None:
    device = tmp_path / "speaker-device-missing"
    spec = load_pipeline(write_pipeline(tmp_path, device=device))
    result = anyio.run(lambda: run_pipeline(spec, handle_signals=False))
    assert result.exit_code == ExitCode.FAILED
    assert [failure.during for failure in result.failures] == ["setup"]
    message = str(result.failures[0].error)
    assert str(device) in message
    assert "load the module first" in message
    # The device is opened first, so a host without the module gets no profile to start containers with.
    assert not (tmp_path / "seccomp.json").exists()


def test_kmod_backend_writes_union_profile(tmp_path: Path) -> None:
    settings = KmodSettings(
        profile=write_profile(tmp_path),
        seccomp_json=tmp_path / "seccomp.json",
        compile=compile_settings("kill-process", "EPERM"),
        deny=DENY_ACTIONS["errno"],
        running_margin=0.5,
    )
    # load_programs reads, compiles and writes without the driver, so no pipeline context is needed.
    backend = KmodBackend("enforce", settings, KmodOptions(), structlog.get_logger("speaker"), context=None)  # type: ignore[arg-type]
    programs = backend.load_programs()
    assert programs.margin is not None
    document = json.loads((tmp_path / "seccomp.json").read_text())
    assert "listenerPath" not in document
    assert document["defaultAction"] == "SCMP_ACT_KILL_PROCESS"
    actions = {rule["action"] for rule in document["syscalls"]}
    assert "SCMP_ACT_NOTIFY" not in actions
    allowed = {name for rule in document["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    assert {"getpgid", "getppid", "getsid"} <= allowed
    assert "sched_yield" not in allowed


def test_settings_follow_options() -> None:
    options = dataclasses.replace(
        EnforceOptions(), backend="kmod", profile="p", deny_action="kill", default_action="errno", errno="EACCES"
    )
    settings = kmod_settings(options)
    assert settings.seccomp_json is None
    assert str(settings.deny) == "kill-process"
    assert str(settings.compile.default_action) == "errno:EACCES"
    assert settings.running_margin == 0.5


# --- Kills from the kernel's audit records, through the stage ------------------------


class RecordingBackend:
    """Stands in for a back end's run loop, which both back ends share: read every batch, emit nothing."""

    def __init__(self) -> None:
        self.received: list[object] = []

    async def run(self, input: Input, output: Output) -> None:
        async for batch in input:
            self.received.extend(batch)

    async def teardown(self) -> None:
        pass


def kill_record(container: str, action: int, serial: int, phase: Phase = Phase.RUNNING) -> SyscallRecord:
    return SyscallRecord(
        container_id=container, pid=4242, comm="perl", arch="x86_64", nr=153, name="vhangup",
        action=action, serial=serial, record_time=1700000000.5, phase=phase,
    )  # fmt: skip


async def run_stage(backend_name: str, events: list[object]) -> tuple[list[object], list[Violation], list[str]]:
    """Run the enforce stage of enforce-audited.toml over ``events`` with a recording back end.

    Return what the back end received, the Violations the stage emitted and the problems it reported.
    """
    spec = load_pipeline(ROOT / "pipelines" / "enforce-audited.toml", [f"stages.enforce.backend={backend_name}"])
    engine = Engine(spec, handle_signals=False)
    engine.build()
    stage = engine.components["enforce"]
    backend = RecordingBackend()
    stage._backend = backend  # type: ignore[attr-defined]
    send, receive = anyio.create_memory_object_stream[tuple](10)
    out_send, out_receive = anyio.create_memory_object_stream[tuple](10)
    output = Output("enforce", [Route("violations", out_send, (Violation,), False)], 100, stage.log)
    for event in events:
        await send.send((event,))
    await send.aclose()
    await stage.run(Input(receive), output)  # type: ignore[arg-type]
    await output.aclose()
    emitted = [event async for batch in out_receive for event in batch]
    return backend.received, emitted, [message for _, message in engine.problems]


@pytest.mark.parametrize("backend", ["notify", "kmod"])
def test_kill_records_become_violations(backend: str) -> None:
    enforced, other = "c0ffee" * 8, "beef" * 16
    start = ContainerEvent(container_id=enforced, action=ContainerAction.START, name="spk-p-x", pid=10)
    running = PhaseChange(container_id=enforced, phase=Phase.RUNNING, previous=Phase.BOOTING)
    records = [
        kill_record(enforced, 0x80000000, serial=1),
        kill_record(enforced, 0x80000000, serial=1, phase=Phase.SHUTDOWN),  # the same record in a second phase
        kill_record(enforced, 0x7FFC0000, serial=2),  # SECCOMP_RET_LOG
        kill_record(enforced, 0x00050001, serial=3),  # SECCOMP_RET_ERRNO | EPERM
        kill_record(other, 0x80000000, serial=4),
        kill_record(enforced, 0x00000000, serial=5),  # SECCOMP_RET_KILL_THREAD
    ]
    die = ContainerEvent(container_id=enforced, action=ContainerAction.DIE, name="spk-p-x", exit_code=159)
    with structlog.testing.capture_logs() as logs:
        received, emitted, problems = anyio.run(run_stage, backend, [start, running, *records, die])

    # The back end receives no syscall record.
    assert received == [start, running, die]
    assert [(v.container_id, v.syscall, v.phase, v.action, v.pid, v.comm, v.arch, v.nr) for v in emitted] == [
        (enforced, "vhangup", Phase.RUNNING, "killed", 4242, "perl", "x86_64", 153),
    ] * 2
    (problem,) = problems
    assert "the kernel's audit records name vhangup; " in problem
    assert "2 violations were reported (vhangup killed in running 2 times)" in problem
    kills = [entry for entry in logs if entry["event"] == "process_killed"]
    assert len(kills) == 1
    (ignored,) = [entry for entry in logs if entry["event"] == "audit_records_ignored"]
    assert ignored["not_a_kill"] == 2
    assert ignored["not_enforced"] == 1
