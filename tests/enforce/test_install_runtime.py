"""install-runtime: the daemon.json edit and the launcher, on files in a temporary directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, ROOT


def install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            PYTHON, "-m", "speaker", "install-runtime",
            "--daemon-json", str(tmp_path / "daemon.json"),
            "--launcher-path", str(tmp_path / "bin" / "speaker-runtime"),
            *args,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_existing_settings_kept(tmp_path: Path) -> None:
    original = {"bridge": "none", "runtimes": {"other": {"path": "/usr/bin/other"}}, "debug": True}
    (tmp_path / "daemon.json").write_text(json.dumps(original))
    result = install(tmp_path, "--name", "speaker-test-rt", "--socket", "/run/speaker/x.sock")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "daemon.json").read_text())
    assert config["bridge"] == "none"
    assert config["debug"] is True
    assert config["runtimes"]["other"] == {"path": "/usr/bin/other"}
    assert config["runtimes"]["speaker-test-rt"] == {"path": str(tmp_path / "bin" / "speaker-runtime")}
    assert "kill -HUP" in result.stdout


def test_missing_daemon_json_created(tmp_path: Path) -> None:
    result = install(tmp_path, "--name", "speaker-test-rt")
    assert result.returncode == 0, result.stderr
    assert list(json.loads((tmp_path / "daemon.json").read_text())["runtimes"]) == ["speaker-test-rt"]


def test_second_install_changes_nothing(tmp_path: Path) -> None:
    install(tmp_path, "--name", "speaker-test-rt")
    before = (tmp_path / "daemon.json").stat().st_mtime_ns
    result = install(tmp_path, "--name", "speaker-test-rt")
    assert "already registers runtime 'speaker-test-rt'" in result.stdout
    assert (tmp_path / "daemon.json").stat().st_mtime_ns == before


def test_invalid_daemon_json_left_alone(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text('{"bridge": "none",\n "runtimes": }\n')
    result = install(tmp_path, "--name", "speaker-test-rt")
    assert result.returncode == 1
    assert "daemon.json:2: invalid JSON" in result.stderr
    assert (tmp_path / "daemon.json").read_text() == '{"bridge": "none",\n "runtimes": }\n'


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = install(tmp_path, "--name", "speaker-test-rt", "--dry-run")
    assert result.returncode == 0
    assert '"speaker-test-rt"' in result.stdout
    assert not (tmp_path / "daemon.json").exists()
    assert not (tmp_path / "bin").exists()
