"""The profile commands on hostile input: file-system errors, malformed files and misleading merges.

Every case runs the real command and expects exit code 2, a message naming
the file, and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from speaker.events import PHASES
from speaker.profiles.speaker_lists import write_atomic
from tests.conftest import DATA, PYTHON, ROOT

FIRST = DATA / "profiles" / "redis-1"
SECOND = DATA / "profiles" / "redis-2"


def speaker(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    command = [PYTHON, "-m", "speaker", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def assert_usage_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {message}" in result.stderr


def copy_lists(target: Path, skip: str = "") -> Path:
    target.mkdir(parents=True)
    for phase in PHASES:
        if phase.value != skip:
            shutil.copy(FIRST / phase.value, target / phase.value)
    return target


def broken_phase_file(tmp_path: Path, kind: str) -> Path:
    """Return a list directory whose booting file is a symlink loop, a directory or a FIFO."""
    directory = copy_lists(tmp_path / f"p_{kind}", skip="booting")
    booting = directory / "booting"
    if kind == "loop":
        booting.symlink_to("booting")
    elif kind == "dir":
        booting.mkdir()
    else:
        os.mkfifo(booting)
    return directory


BROKEN = {
    "loop": "cannot read the file: too many levels of symbolic links",
    "dir": "cannot read the file: it is a directory, not a regular file",
    "fifo": "cannot read the file: it is a FIFO, not a regular file",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_unreadable_phase_file_named(tmp_path: Path, kind: str) -> None:
    directory = broken_phase_file(tmp_path, kind)
    expected = f"{directory / 'booting'}: {BROKEN[kind]}"
    assert_usage_error(speaker("profile", "show", str(directory)), expected)
    assert_usage_error(speaker("profile", "diff", str(FIRST), str(directory)), expected)
    assert_usage_error(speaker("profile", "merge", str(FIRST), str(directory), "-o", str(tmp_path / "merged")), expected)
    assert_usage_error(speaker("profile", "show", str(FIRST), "--baseline", str(directory)), expected)


def test_fifo_profile_json_does_not_hang(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    shutil.copytree(FIRST, directory)
    (directory / "profile.json").unlink()
    os.mkfifo(directory / "profile.json")
    result = speaker("profile", "show", str(directory))
    assert_usage_error(result, f"{directory / 'profile.json'}: {BROKEN['fifo']}")


@pytest.fixture
def open_tmp_path():
    """Return a temporary directory that user nobody can enter, unlike pytest's tmp_path."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    path = Path(tempfile.mkdtemp(prefix="speaker-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("denied", ["file", "directory", "parent"])
def test_profile_without_permission(open_tmp_path: Path, denied: str) -> None:
    # root reads any file, so the command runs as nobody (65534).
    directory = copy_lists(open_tmp_path / "parent" / "p")
    (open_tmp_path / "parent").chmod(0o755)
    if denied == "file":
        (directory / "booting").chmod(0)
        expected = f"{directory / 'booting'}: cannot read the file: permission denied"
    elif denied == "directory":
        directory.chmod(0)
        expected = f"{directory}: cannot read the directory: permission denied"
    else:
        (open_tmp_path / "parent").chmod(0)
        expected = f"{directory}: cannot read: permission denied"
    result = speaker("profile", "show", str(directory), user=65534)
    (open_tmp_path / "parent").chmod(0o755)
    directory.chmod(0o755)
    assert_usage_error(result, expected)


def test_merge_output_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "existing"
    target.write_text("keep\n")
    result = speaker("profile", "merge", str(FIRST), str(SECOND), "-o", str(target))
    assert_usage_error(result, f"{target}: is a file, not a directory; pass a new or existing directory to -o")
    assert target.read_text() == "keep\n"


@pytest.mark.parametrize("action", ["merge", "export"])
def test_output_under_proc_rejected(action: str) -> None:
    if action == "merge":
        result = speaker("profile", "merge", str(FIRST), str(SECOND), "-o", "/proc/spk-j2-x")
    else:
        result = speaker("profile", "export", str(FIRST), "--format", "docker", "-o", "/proc/spk-j2-x")
    assert_usage_error(result, "/proc/spk-j2-x: cannot write: no such file or directory")


def test_export_to_directory_rejected(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    target.mkdir()
    result = speaker("profile", "export", str(FIRST), "--format", "docker", "-o", f"{target}/")
    assert_usage_error(result, f"{target}/: is a directory; pass a file name to -o, or use --format speaker to write a directory")
    assert list(target.iterdir()) == []


def test_write_atomic_removes_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(target, "text\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rt"]


def test_report_output_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "existing"
    target.write_text("keep\n")
    result = speaker("report", str(DATA / "profiles" / "redis-1-trace.jsonl"), "-o", str(target))
    assert_usage_error(result, f"{target}: is a file, not a directory")


def test_nested_profile_json_rejected(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    shutil.copytree(FIRST, directory)
    (directory / "profile.json").write_text("[" * 100_000)
    result = speaker("profile", "show", str(directory))
    assert_usage_error(result, f"{directory / 'profile.json'}: invalid JSON: arrays or objects are nested too deeply")


def test_errno_name_in_docker_json_rejected(tmp_path: Path) -> None:
    document = json.loads((FIRST / "docker-union.json").read_text())
    document["defaultAction"] = "SCMP_ACT_ERRNO"
    document["defaultErrnoRet"] = "EPERM"
    path = tmp_path / "errno.json"
    path.write_text(json.dumps(document, indent=2))
    result = speaker("profile", "show", str(path))
    line = next(number for number, text in enumerate(path.read_text().splitlines(), 1) if "defaultErrnoRet" in text)
    assert_usage_error(result, f'{path}:{line}: defaultErrnoRet must be an errno number such as 1 (EPERM), got "EPERM"')


@pytest.mark.parametrize("where", ["top", "trace"])
def test_complete_must_be_boolean(tmp_path: Path, where: str) -> None:
    directory = tmp_path / "p"
    shutil.copytree(FIRST, directory)
    data = json.loads((directory / "profile.json").read_text())
    if where == "top":
        data["complete"] = "yes"
        expected = '"complete" must be true or false, got "yes"'
    else:
        data["traces"][0]["complete"] = "yes"
        expected = 'traces[0].complete must be true or false, got "yes"'
    (directory / "profile.json").write_text(json.dumps(data, indent=2))
    result = speaker("profile", "show", str(directory))
    assert result.returncode == 2
    assert f"{directory / 'profile.json'}:" in result.stderr
    assert expected in result.stderr


def test_merge_of_untraced_profiles_is_unknown(tmp_path: Path) -> None:
    lists = copy_lists(tmp_path / "lists")
    docker = FIRST / "docker-union.json"
    result = speaker("profile", "merge", str(lists), str(docker), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert "0 traces, complete: unknown" in result.stdout
    show = speaker("profile", "show", str(tmp_path / "merged"))
    assert "Complete: unknown" in show.stdout


def test_merge_untraced_with_traced_is_incomplete(tmp_path: Path) -> None:
    lists = copy_lists(tmp_path / "lists")
    result = speaker("profile", "merge", str(lists), str(FIRST), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert "complete: no" in result.stdout
    data = json.loads((tmp_path / "merged" / "profile.json").read_text())
    assert data["complete"] is False
    assert data["problems"] == [
        f"{lists} records no trace (it is a list directory or a seccomp JSON), so nothing shows that its lists are complete"
    ]


def test_merge_same_trace_twice_rejected(tmp_path: Path) -> None:
    assert_usage_error(
        speaker("profile", "merge", str(FIRST), str(FIRST), "-o", str(tmp_path / "merged")),
        f"{FIRST} and {FIRST} are the same profile: merging it twice would double its counts",
    )
    copy = tmp_path / "copy"
    shutil.copytree(FIRST, copy)
    assert_usage_error(
        speaker("profile", "merge", str(FIRST), str(copy), "-o", str(tmp_path / "merged")),
        f"{FIRST} and {copy} both contain the trace of container b9883d9fccb6",
    )
    assert not (tmp_path / "merged").exists()


def test_seccomp_profile_yaml_explained(tmp_path: Path) -> None:
    path = tmp_path / "spo.yaml"
    assert speaker("profile", "export", str(FIRST), "--format", "spo", "-o", str(path)).returncode == 0
    result = speaker("profile", "show", str(path))
    assert_usage_error(result, f"{path}: this is a Kubernetes SeccompProfile (YAML), which SPEAKER writes but cannot read")
    assert "pass the profile directory or profile.json it was exported from" in result.stderr


def test_notify_export_names_listener_option() -> None:
    result = speaker("profile", "export", str(FIRST), "--format", "docker", "--phase", "notify")
    assert_usage_error(result, "--phase notify needs --listener-path")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("READ\nepoll_wait\n", ":1: unknown syscall name 'READ': syscall names are lower case; did you mean 'read'?"),
        ("read\n" + "x" * 50_000_000 + "\n", ":2: 'xxxx"),
    ],
    ids=["upper-case", "huge-name"],
)
def test_bad_list_name_message(tmp_path: Path, content: str, message: str) -> None:
    directory = copy_lists(tmp_path / "p")
    (directory / "running").write_text(content)
    result = speaker("profile", "show", str(directory))
    assert_usage_error(result, f"{directory / 'running'}{message}")
    assert len(result.stderr) < 500


def test_list_file_with_byte_order_mark(tmp_path: Path) -> None:
    directory = copy_lists(tmp_path / "p")
    (directory / "running").write_bytes(b"\xef\xbb\xbf" + (FIRST / "running").read_bytes())
    result = speaker("profile", "diff", str(FIRST), str(directory), "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr
