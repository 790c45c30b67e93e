"""Pipeline file validation: every invalid file fails with the message it expects."""

from __future__ import annotations

from pathlib import Path

import pytest

from speaker.config import ConfigError, load_pipeline
from tests.conftest import DATA, ROOT
from tests.core.test_engine import run_cli

BAD_CONFIGS = sorted((DATA / "bad-configs").glob("*.toml"))


def expected_message(path: Path) -> str:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# expect: "), f"{path} must start with '# expect: MESSAGE'"
    return first_line.removeprefix("# expect: ").replace("{file}", str(path.relative_to(ROOT)))


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=lambda path: path.stem)
def test_bad_config_rejected(path: Path) -> None:
    result = run_cli("validate", str(path.relative_to(ROOT)))
    assert result.returncode == 2, result.stdout
    assert expected_message(path) in result.stderr


def test_bad_configs_present() -> None:
    assert len(BAD_CONFIGS) >= 15


def test_set_override_changes_option(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[sources.gen]\ntype = "synthetic"\n\n[sinks.out]\ntype = "count"\ninputs = ["gen"]\n')
    spec = load_pipeline(pipeline, ["sources.gen.count=7", "sources.gen.syscalls=[1, 2]", "pipeline.buffer=3"])
    assert spec.components["gen"].options.count == 7
    assert spec.components["gen"].options.syscalls == [1, 2]
    assert spec.settings.buffer == 3


def test_set_override_string_fallback(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[sources.gen]\ntype = "synthetic"\n\n[sinks.out]\ntype = "jsonl"\ninputs = ["gen"]\npath = "x"\n')
    spec = load_pipeline(pipeline, ["sinks.out.path=/tmp/some file.jsonl"])
    assert spec.components["out"].options.path == "/tmp/some file.jsonl"


def test_set_override_error_names_flag(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[sources.gen]\ntype = "synthetic"\n\n[sinks.out]\ntype = "count"\ninputs = ["gen"]\n')
    with pytest.raises(ConfigError) as caught:
        load_pipeline(pipeline, ["sources.gen.count=many"])
    assert str(caught.value) == (
        f"{pipeline} (--set sources.gen.count) [sources.gen] key 'count': expected an integer, got a string (\"many\")"
    )


def test_set_override_malformed(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[sources.gen]\ntype = "synthetic"\n\n[sinks.out]\ntype = "count"\ninputs = ["gen"]\n')
    with pytest.raises(ConfigError, match="write TABLE.NAME.KEY=VALUE"):
        load_pipeline(pipeline, ["sources.gen.count"])
    with pytest.raises(ConfigError, match="a component option needs three parts"):
        load_pipeline(pipeline, ["sources.gen=3"])


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found; pass the path of a pipeline file"):
        load_pipeline(tmp_path / "absent.toml")
