"""The violations sink: JSON lines, per-phase counts at exit, and the exit code option."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, ROOT

COMPONENTS = "tests.enforce.components"


def run_pipeline(tmp_path: Path, extra: str = "") -> subprocess.CompletedProcess[str]:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f"""
[sources.replay]
type = "{COMPONENTS}:FixedViolations"

[sinks.violations]
type = "violations"
inputs = ["replay"]
path = "{tmp_path / "out" / "violations.jsonl"}"
summary = "{tmp_path / "out" / "summary.json"}"
{extra}
"""
    )
    return subprocess.run(
        [PYTHON, "-m", "speaker", "--log-format", "json", "run", str(pipeline)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_lines_and_summary_written(tmp_path: Path) -> None:
    result = run_pipeline(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "violations.jsonl").read_text().splitlines()]
    assert [line["syscall"] for line in lines] == ["mount", "mount", "chroot"]
    assert lines[0]["type"] == "Violation"
    assert lines[0]["phase"] == "running"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["total"] == 3
    assert summary["phases"] == {"booting": 1, "running": 2, "shutdown": 0}
    assert {"container_id": "c1", "phase": "running", "syscall": "mount", "action": "denied", "count": 2} in summary[
        "violations"
    ]


def test_summary_logged_at_exit(tmp_path: Path) -> None:
    result = run_pipeline(tmp_path)
    logged = [json.loads(line) for line in result.stderr.splitlines() if '"violations_summary"' in line]
    assert len(logged) == 1
    assert logged[0]["total"] == 3
    assert logged[0]["running"] == 2
    assert logged[0]["booting"] == 1
    assert logged[0]["shutdown"] == 0


def test_fail_on_violation_exit_code(tmp_path: Path) -> None:
    result = run_pipeline(tmp_path, "fail_on_violation = true")
    assert result.returncode == 4
    assert "3 violations" in result.stderr
