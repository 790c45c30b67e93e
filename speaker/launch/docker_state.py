"""Signal numbers, Docker event actions, and container facts from ``docker inspect``."""

from __future__ import annotations

import dataclasses
import datetime
import signal
from collections.abc import Mapping
from typing import Any

from speaker.events import ContainerAction

_ACTIONS = {action.value: action for action in ContainerAction if action is not ContainerAction.EVENTS_GAP}


def signal_number(value: str | int | None, default: int = signal.SIGTERM) -> int:
    """Return the number of a signal written as ``SIGTERM``, ``TERM``, ``15`` or ``SIGRTMIN+3``.

    An empty value gives ``default``. Raises ValueError for an unknown name.
    """
    if value is None or value == "":
        return int(default)
    if isinstance(value, int):
        return value
    text = value.strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    base, plus, offset = text.partition("+")
    if base in ("SIGRTMIN", "SIGRTMAX") and (not plus or offset.isdigit()):
        number = int(getattr(signal, base)) + (int(offset) if plus else 0)
        return number
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


def parse_action(text: str) -> tuple[ContainerAction | None, str]:
    """Split a Docker event action such as ``health_status: healthy`` into a ContainerAction and its argument.

    Returns (None, "") for actions SPEAKER does not use (attach, resize, ...).
    """
    name, _, argument = text.partition(":")
    return _ACTIONS.get(name.strip()), argument.strip()


@dataclasses.dataclass(frozen=True)
class ContainerFacts:
    """Facts about a container from ``docker inspect``."""

    id: str
    name: str
    image: str
    #: Host pid of its init process, 0 when it is not running.
    pid: int
    #: Stop signal number (Config.StopSignal, SIGTERM by default).
    stop_signal: int
    labels: Mapping[str, str]
    running: bool
    #: Start and finish times in seconds since the epoch, 0.0 when unknown.
    started_at: float
    finished_at: float
    exit_code: int | None


def facts_from_inspect(data: Mapping[str, Any]) -> ContainerFacts:
    """Read the facts from a ``GET /containers/ID/json`` reply."""
    config = data.get("Config") or {}
    state = data.get("State") or {}
    try:
        stop_signal = signal_number(config.get("StopSignal"))
    except ValueError:
        stop_signal = int(signal.SIGTERM)
    running = bool(state.get("Running"))
    return ContainerFacts(
        id=data.get("Id", ""),
        name=str(data.get("Name", "")).lstrip("/"),
        image=config.get("Image", ""),
        pid=int(state.get("Pid") or 0) if running else 0,
        stop_signal=stop_signal,
        labels=dict(config.get("Labels") or {}),
        running=running,
        started_at=parse_docker_time(state.get("StartedAt")),
        finished_at=parse_docker_time(state.get("FinishedAt")),
        exit_code=None if running else state.get("ExitCode"),
    )


def parse_docker_time(text: str | None) -> float:
    """Convert Docker's RFC 3339 time with nanoseconds to seconds since the epoch; 0.0 for its zero time."""
    if not text or text.startswith("0001-01-01"):
        return 0.0
    main, _, fraction = text.rstrip("Z").partition(".")
    digits = "".join(ch for ch in fraction if ch.isdigit())
    zone = fraction[len(digits) :] or "+00:00"
    moment = datetime.datetime.fromisoformat(main + zone)
    return moment.timestamp() + (float("0." + digits) if digits else 0.0)
