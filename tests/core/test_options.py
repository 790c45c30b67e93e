"""Option value types: durations, sizes and conversion errors."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from speaker.options import ByteSize, Duration, OptionError, build_options, option


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("1h", 3600.0), ("250us", 0.00025), (".5s", 0.5)],
)
def test_duration_parse(text: str, seconds: float) -> None:
    assert Duration.parse(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["2", "2 sec", "s", "-1s", "1d", ""])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        Duration.parse(text)


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "500ms"), (2.0, "2s"), (90.0, "90s"), (120.0, "2m"), (0.0, "0s")])
def test_duration_str(seconds: float, text: str) -> None:
    assert str(Duration(seconds)) == text


@pytest.mark.parametrize(("text", "size"), [("16MiB", 16 * 2**20), ("64KiB", 65536), ("1GiB", 2**30), ("512", 512)])
def test_byte_size_parse(text: str, size: int) -> None:
    assert ByteSize.parse(text) == size
    assert str(ByteSize(size)) == text


@dataclasses.dataclass(frozen=True)
class Sample:
    timeout: Duration = option(Duration(1), help="Timeout.")
    mode: Literal["enforce", "complain"] = option("enforce", help="Mode.")
    ports: list[int] = option([], help="Ports.")
    env: dict[str, str] = option({}, help="Environment.")
    limit: int | None = option(None, min=1, help="Limit.")


def test_build_options_converts() -> None:
    built = build_options(Sample, {"timeout": "250ms", "mode": "complain", "ports": [80], "env": {"A": "1"}, "limit": 3})
    assert built == Sample(timeout=Duration(0.25), mode="complain", ports=[80], env={"A": "1"}, limit=3)


def test_build_options_defaults_are_copies() -> None:
    first = build_options(Sample, {})
    second = build_options(Sample, {})
    first.ports.append(1)
    assert second.ports == []


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"mode": "strict"}, "mode", "invalid value 'strict': expected one of 'enforce', 'complain'"),
        ({"ports": [80, "http"]}, "ports[1]", 'expected an integer, got a string ("http")'),
        ({"env": {"A": 1}}, "env.A", "expected a string, got an integer (1)"),
        ({"limit": 0}, "limit", "0 is below the minimum 1"),
        ({"timeout": True}, "timeout", 'expected a duration string such as "2s", got a boolean (true)'),
        ({"limt": 3}, "limt", "unknown option 'limt'; did you mean 'limit'?"),
    ],
)
def test_build_options_errors(raw: dict, key: str, message: str) -> None:
    with pytest.raises(OptionError) as caught:
        build_options(Sample, raw)
    assert caught.value.key_path == key
    assert message in str(caught.value)
