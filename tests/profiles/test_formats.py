"""Profile formats: byte-for-byte round trips, reading every format, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from speaker.events import PHASES, Phase
from speaker.profiles import ProfileError, load_profile, read_profile_dir, write_profile_dir
from speaker.profiles.docker_json import read_seccomp_json
from speaker.profiles.profile_json import dump_profile, read_profile_json
from speaker.profiles.speaker_lists import read_lists_dir, write_lists_dir
from tests.conftest import DATA

REDIS = DATA / "profiles" / "redis-1"


def copy_lists(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for phase in PHASES:
        shutil.copy(source / phase.value, target / phase.value)
    return target


def test_speaker_lists_round_trip_bytes(tmp_path: Path) -> None:
    original = copy_lists(REDIS, tmp_path / "original")
    profile = read_lists_dir(original)
    write_lists_dir(profile, tmp_path / "written")
    for phase in PHASES:
        assert (tmp_path / "written" / phase.value).read_bytes() == (original / phase.value).read_bytes()


def test_speaker_lists_fixture_contents() -> None:
    profile = read_lists_dir(REDIS)
    # Counted by hand from the fixture files: 54, 10 and 9 lines.
    assert len(profile.phase(Phase.BOOTING)) == 54
    assert len(profile.phase(Phase.RUNNING)) == 10
    assert len(profile.phase(Phase.SHUTDOWN)) == 9
    assert "accept4" in profile.phase(Phase.RUNNING)
    assert "execve" in profile.phase(Phase.BOOTING)
    assert "execve" not in profile.phase(Phase.RUNNING)
    assert profile.arches == ("x86_64",)


def test_profile_json_round_trip_bytes(tmp_path: Path) -> None:
    text = (REDIS / "profile.json").read_text()
    profile, record = read_profile_json(REDIS / "profile.json")
    assert dump_profile(profile, record) == text


def test_profile_directory_round_trip_bytes(tmp_path: Path) -> None:
    profile, record = read_profile_dir(REDIS)
    assert record is not None
    written = write_profile_dir(profile, tmp_path / "again")
    names = sorted(path.name for path in REDIS.iterdir())
    assert sorted(path.name for path in written.files) == names
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (REDIS / name).read_bytes(), name


def test_profile_json_keeps_provenance() -> None:
    profile, record = read_profile_json(REDIS / "profile.json")
    assert profile.complete
    trace = profile.traces[0]
    assert trace.image == "speaker-demo/redis"
    assert trace.container_name == "spk-c-capture-redis"
    assert [item.phase for item in trace.transitions] == list(PHASES)
    assert trace.transitions[1].detector == "log"
    assert trace.detector == "log"
    assert trace.kernel
    assert trace.libseccomp_version == "2.5.4"
    # The capture counted 34173 records in all (tests/data/profiles/README.md).
    assert sum(profile.phase_calls(phase) for phase in PHASES) == 34173
    assert record is not None
    assert record.invariants["clone3"] == "errno:ENOSYS"


def test_original_unsorted_lists_read_and_sort(tmp_path: Path) -> None:
    directory = tmp_path / "original"
    directory.mkdir()
    (directory / "booting").write_text("write\nread\nexecve\n")
    (directory / "running").write_text("write\nread\n")
    (directory / "shutdown").write_text("exit_group\nwrite\n")
    profile = read_lists_dir(directory)
    write_lists_dir(profile, tmp_path / "sorted")
    assert (tmp_path / "sorted" / "booting").read_text() == "execve\nread\nwrite\n"


def test_lists_compat_name_goes_to_x86(tmp_path: Path) -> None:
    directory = tmp_path / "lists"
    directory.mkdir()
    for phase in PHASES:
        (directory / phase.value).write_text("mmap2\nread\n")
    profile = read_lists_dir(directory)
    assert profile.phase(Phase.RUNNING, "x86") == {"mmap2"}
    assert profile.phase(Phase.RUNNING, "x86_64") == {"read"}


def test_edited_list_file_wins_over_profile_json(tmp_path: Path) -> None:
    directory = tmp_path / "edited"
    shutil.copytree(REDIS, directory)
    running = (directory / "running").read_text().splitlines()
    running.remove("setsockopt")
    (directory / "running").write_text("".join(f"{name}\n" for name in sorted(running + ["getpid"])))
    profile, _ = read_profile_dir(directory)
    assert "setsockopt" not in profile.phase(Phase.RUNNING)
    assert "getpid" in profile.phase(Phase.RUNNING)
    assert any("running was edited" in note and "getpid" in note for note in profile.notes)


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ("read\nopne\nwrite\n", 2, "did you mean 'open'"),
        ("read\nwrite\nread\n", 3, "duplicate syscall 'read', first listed on line 1"),
        ("read\n\nwrite\n", 2, "empty line"),
        ("read\n# comment\n", 2, "is not a syscall name"),
    ],
)
def test_bad_list_line_named(tmp_path: Path, content: str, line: int, fragment: str) -> None:
    directory = copy_lists(REDIS, tmp_path / "bad")
    (directory / "running").write_text(content)
    with pytest.raises(ProfileError) as caught:
        load_profile(directory)
    assert caught.value.path == str(directory / "running")
    assert caught.value.line == line
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"{directory / 'running'}:{line}: ")


def test_empty_phase_file_rejected(tmp_path: Path) -> None:
    directory = copy_lists(REDIS, tmp_path / "empty")
    (directory / "shutdown").write_text("")
    with pytest.raises(ProfileError, match="empty phase") as caught:
        load_profile(directory)
    assert caught.value.path == str(directory / "shutdown")


def test_missing_phase_file_rejected(tmp_path: Path) -> None:
    directory = copy_lists(REDIS, tmp_path / "missing")
    (directory / "booting").unlink()
    with pytest.raises(ProfileError, match="missing phase file"):
        load_profile(directory)


def test_not_a_profile_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.json").write_text('{"hello": 1}\n')
    (tmp_path / "plain").mkdir()
    with pytest.raises(ProfileError, match="not a seccomp profile"):
        load_profile(tmp_path / "notes.json")
    with pytest.raises(ProfileError, match="not a profile directory"):
        load_profile(tmp_path / "plain")
    with pytest.raises(ProfileError, match="pass the directory that contains it"):
        load_profile(REDIS / "running")


def test_profile_json_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text('{\n  "format": "speaker-profile",\n  "version": 1,\n  oops\n}\n')
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert caught.value.line == 4
    assert "invalid JSON" in str(caught.value)


def test_profile_json_unknown_name_line(tmp_path: Path) -> None:
    text = (REDIS / "profile.json").read_text().replace('"name": "accept4"', '"name": "acept4"')
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert "did you mean 'accept4'" in str(caught.value)
    expected_line = text.splitlines().index(next(line for line in text.splitlines() if '"acept4"' in line)) + 1
    assert caught.value.line == expected_line


def test_profile_json_other_architecture(tmp_path: Path) -> None:
    data = json.loads((REDIS / "profile.json").read_text())
    data["arches"]["aarch64"] = data["arches"].pop("x86_64")
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ProfileError, match="this profile is for aarch64") as caught:
        load_profile(path)
    assert caught.value.line is not None


def test_profile_json_wrong_number(tmp_path: Path) -> None:
    text = (REDIS / "profile.json").read_text()
    data = json.loads(text)
    data["arches"]["x86_64"]["running"][0]["nr"] = 999
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ProfileError, match="has number 999 here, but libseccomp numbers it"):
        load_profile(path)


def test_docker_json_reads_as_all_phases() -> None:
    profile = load_profile(REDIS / "docker-union.json")
    for phase in PHASES:
        assert profile.phase(phase) == load_profile(REDIS).union() | {"exit", "exit_group", "restart_syscall", "rt_sigreturn"}


def test_docker_json_other_architecture(tmp_path: Path) -> None:
    path = tmp_path / "arm.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_AARCH64"], "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}))
    with pytest.raises(ProfileError, match="this profile is for aarch64"):
        load_profile(path)


def test_docker_json_duplicate_and_unknown(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text(
        '{"defaultAction": "SCMP_ACT_ERRNO",\n "syscalls": [\n  {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},\n'
        '  {"names": ["close", "read"], "action": "SCMP_ACT_ALLOW"}\n ]\n}\n'
    )
    with pytest.raises(ProfileError, match="duplicate syscall 'read'"):
        load_profile(path)
    path.write_text('{"defaultAction": "SCMP_ACT_ERRNO",\n "syscalls": [\n  {"names": ["read", "clsoe"], "action": "SCMP_ACT_ALLOW"}\n ]\n}\n')
    with pytest.raises(ProfileError, match="did you mean 'close'") as caught:
        load_profile(path)
    assert caught.value.line == 3
    relaxed = read_seccomp_json(path, strict=False)
    assert relaxed.phase(Phase.RUNNING) == {"read"}
    assert any("skipped clsoe" in note for note in relaxed.notes)


def test_docker_json_rejects_deny_list_and_notify(tmp_path: Path) -> None:
    path = tmp_path / "deny.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]}))
    with pytest.raises(ProfileError, match="deny-list"):
        load_profile(path)
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}]}))
    with pytest.raises(ProfileError, match="notify-layout profile"):
        load_profile(path)


def test_complete_profile_with_empty_phase_rejected(tmp_path: Path) -> None:
    data = json.loads((REDIS / "profile.json").read_text())
    data["arches"]["x86_64"]["shutdown"] = []
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "profile.json").write_text(json.dumps(data, indent=2))
    with pytest.raises(ProfileError, match=r"empty phase \(shutdown\)"):
        load_profile(directory)
    data["traces"][0]["complete"] = False
    data["traces"][0]["problems"] = ["the trace ended before the container was asked to stop"]
    (directory / "profile.json").write_text(json.dumps(data, indent=2))
    assert not load_profile(directory).phase(Phase.SHUTDOWN)


def test_notify_json_never_notifies_write() -> None:
    from speaker.compile import CompileSettings, notify_plan
    from speaker.profiles.docker_json import plan_to_json

    lists = {"x86_64": {Phase.BOOTING: {"read", "write", "mount"}, Phase.RUNNING: {"read"}, Phase.SHUTDOWN: {"read"}}}
    document = plan_to_json(notify_plan(lists, CompileSettings()), listener_path="/run/speaker/notify.sock")
    rules = {rule["action"]: rule["names"] for rule in document.data["syscalls"]}
    assert "write" in rules["SCMP_ACT_ALLOW"]
    assert rules["SCMP_ACT_NOTIFY"] == ["mount"]
    assert any("runc rejects SCMP_ACT_NOTIFY" in warning for warning in document.warnings)


def test_incomplete_pipeline_profile_loads() -> None:
    # Written by the profile_files sink in a real pipeline run. Redis's shutdown
    # syscalls fell into the audit interval that straddled the stop signal,
    # which counts as running, and 12 records of exiting processes could not be attributed.
    profile = load_profile(DATA / "profiles" / "redis-pipeline")
    assert not profile.complete
    assert not profile.phase(Phase.SHUTDOWN)
    assert profile.traces[0].lost == {"unattributed": 12}
    assert [item.detector for item in profile.traces[0].transitions] == ["start", "listen", "kill"]
