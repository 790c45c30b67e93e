"""Log configuration: one value of the container key per container."""

from __future__ import annotations

import io
import json

import structlog

from speaker import logs


def test_full_container_id_shortened_to_dockers_twelve() -> None:
    stream = io.StringIO()
    logs.configure("json", "info", stream)
    full = "4f1c2a9be07d" + "0" * 52
    structlog.get_logger("speaker").info("a", container=full)
    structlog.get_logger("speaker").info("b", container="4f1c2a9be07d")
    # Not a container id: a name, and 64 characters that are not all hex digits.
    structlog.get_logger("speaker").info("c", container="speaker-enforce")
    structlog.get_logger("speaker").info("d", container="g" * 64)
    values = [json.loads(line)["container"] for line in stream.getvalue().splitlines()]
    assert values == ["4f1c2a9be07d", "4f1c2a9be07d", "speaker-enforce", "g" * 64]
