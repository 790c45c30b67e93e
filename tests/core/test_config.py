"""Pipeline file validation: every invalid file fails with the message it expects."""

from __future__ import annotations

import os
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


def write_minimal(path: Path) -> Path:
    path.write_text('[sources.gen]\ntype = "synthetic"\n\n[sinks.out]\ntype = "count"\ninputs = ["gen"]\n')
    return path


def test_set_unknown_component_rejected(tmp_path: Path) -> None:
    pipeline = write_minimal(tmp_path / "p.toml")
    with pytest.raises(ConfigError, match=r"the file has no \[sources.other\] table"):
        load_pipeline(pipeline, ["sources.other.count=1"])


def test_set_several_values_rejected(tmp_path: Path) -> None:
    pipeline = write_minimal(tmp_path / "p.toml")
    with pytest.raises(ConfigError, match="VALUE must be one TOML value"):
        load_pipeline(pipeline, ['sources.gen.count=1\n[sources.evil]\ntype = "synthetic"'])


def test_pipeline_path_not_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_pipeline(fifo)
    with pytest.raises(ConfigError, match="a directory"):
        load_pipeline(tmp_path)


def test_deep_toml_nesting_rejected(tmp_path: Path) -> None:
    pipeline = tmp_path / "deep.toml"
    pipeline.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_pipeline(pipeline)


def test_long_stage_chain_validates(tmp_path: Path) -> None:
    # Listed consumer first, so a recursive graph walk would go 3000 deep.
    lines = ['[sinks.out]\ntype = "count"\ninputs = ["s2999"]\n']
    for index in range(2999, 0, -1):
        lines.append(f'[stages.s{index}]\ntype = "select"\ninputs = ["s{index - 1}"]\n')
    lines.append('[stages.s0]\ntype = "select"\ninputs = ["gen"]\n[sources.gen]\ntype = "synthetic"\n')
    pipeline = tmp_path / "chain.toml"
    pipeline.write_text("\n".join(lines))
    assert len(load_pipeline(pipeline).components) == 3002


def test_unknown_type_suggests_builtin(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[sources.gen]\ntype = "synthtic"\n\n[sinks.out]\ntype = "count"\ninputs = ["gen"]\n')
    with pytest.raises(ConfigError, match="unknown source type 'synthtic'; did you mean 'synthetic'?"):
        load_pipeline(pipeline)


@pytest.mark.parametrize(
    ("module_text", "message"),
    [
        ("raise RuntimeError('broken at import')", "raised RuntimeError: broken at import; fix the module"),
        ("import sys\nsys.exit(3)", "raised SystemExit: 3; fix the module"),
        (
            "from speaker.component import Stage\nclass Custom(Stage):\n    Options = int\n",
            "Options must be a dataclass",
        ),
        (
            "from speaker.component import Stage\nclass Custom(Stage):\n    accepts = ('SyscallRecord',)\n",
            "accepts must be a tuple of event classes",
        ),
    ],
    ids=["raises", "exits", "options-not-dataclass", "accepts-strings"],
)
def test_broken_custom_module_rejected(tmp_path: Path, module_text: str, message: str) -> None:
    (tmp_path / "broken_stage.py").write_text(module_text)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[sources.gen]\ntype = "synthetic"\n\n[stages.custom]\ntype = "broken_stage:Custom"\ninputs = ["gen"]\n\n'
        '[sinks.out]\ntype = "count"\ninputs = ["custom"]\n'
    )
    result = run_cli("validate", str(pipeline), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
