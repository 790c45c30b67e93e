"""structlog configuration: console lines on a terminal, JSON lines otherwise.

Components log through ``structlog.get_logger("speaker").bind(component=NAME)``
with stable keys (``container``, ``phase``, ``syscall``), one line per state
change and never one per syscall.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "console", "json"]
LEVELS = ("debug", "info", "warning", "error")
_HEX = frozenset("0123456789abcdef")


def short_container_ids(_logger: object, _method: str, event_dict: dict) -> dict:
    """Shorten a full 64-digit ``container`` id to Docker's 12, so one container has one key value in every line."""
    container = event_dict.get("container")
    if isinstance(container, str) and len(container) == 64 and _HEX.issuperset(container):
        event_dict["container"] = container[:12]
    return event_dict


def configure(log_format: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog events to ``stream`` (stderr by default) at ``level`` and above."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderer: structlog.types.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            short_container_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            *([structlog.processors.dict_tracebacks] if log_format == "json" else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
