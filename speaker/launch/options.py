"""The ``launch`` table of the docker_events source: the container to create and trace.

Every key can be set from the command line, for example
``--set sources.docker.launch.image=speaker-demo/nginx`` or
``--set 'sources.docker.launch.command=["redis-server", "--port", "6380"]'``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from speaker.options import Duration, OptionError, build_options, option


@dataclasses.dataclass(frozen=True)
class Healthcheck:
    test: list[str] = option(
        help='Health check command as Docker writes it, such as ["CMD", "redis-cli", "ping"] or ["CMD-SHELL", "..."].'
    )
    interval: Duration = option(Duration.parse("1s"), min=0.001, help="Time between two checks.")
    timeout: Duration = option(Duration.parse("5s"), min=0.001, help="Time after which one check fails.")
    retries: int = option(3, min=1, help="Failed checks in a row that make the container unhealthy.")
    start_period: Duration = option(
        Duration.parse("0s"), help="Time after the start during which failed checks do not count."
    )


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    image: str = option(help="Image of the container to trace, such as speaker-demo/redis.")
    command: list[str] | None = option(None, help="Command that replaces the image's CMD.")
    entrypoint: list[str] | None = option(None, help="Entrypoint that replaces the image's ENTRYPOINT.")
    env: dict[str, str] = option({}, help="Environment variables, as a table of names and values.")
    ports: list[str] = option(
        [],
        help='Published ports as docker run -p writes them: "HOST:CONTAINER[/PROTO]" or "IP:HOST:CONTAINER". '
        'They need network = "bridge" or another network with port mapping.',
    )
    user: str = option("", help="User (and group) the command runs as, such as postgres or 1000:1000.")
    name: str = option("", help="Container name; empty lets Docker choose one.")
    labels: dict[str, str] = option({}, help="Extra container labels.")
    network: str = option(
        "none", help='Network mode: "none" (no network), "host", or a network name. Avoid bridge networks on shared hosts.'
    )
    stop_timeout: int | None = option(
        None, min=0, help="Seconds docker stop waits after the stop signal before SIGKILL; unset uses Docker's 10 s."
    )
    stop_signal: str = option("", help="Stop signal, such as SIGQUIT; empty keeps the image's (SIGTERM by default).")
    runtime: str = option("", help="OCI runtime registered with dockerd, such as runc; empty uses the default.")
    seccomp: str = option(
        "log",
        help='Seccomp profile: "log" (log every syscall, for tracing), a path to a Docker seccomp JSON profile, '
        '"default" (Docker\'s default profile) or "unconfined".',
    )
    workdir: str = option("", help="Working directory of the command.")
    hostname: str = option("", help="Host name inside the container.")
    cap_add: list[str] = option([], help="Capabilities to add, such as NET_ADMIN.")
    cap_drop: list[str] = option([], help="Capabilities to drop, such as ALL.")
    tmpfs: list[str] = option([], help='tmpfs mounts as docker run --tmpfs writes them: "PATH" or "PATH:OPTIONS".')
    volumes: list[str] = option([], help='Bind mounts as docker run -v writes them: "HOST:CONTAINER[:ro]".')
    read_only: bool = option(False, help="Mount the container's root file system read-only.")
    security_opt: list[str] = option(
        [], help='Other docker run --security-opt values, such as "no-new-privileges"; use seccomp for the profile.'
    )
    healthcheck: dict[str, Any] = option(
        {}, help="Health check as a table: test, interval, timeout, retries, start_period. Empty keeps the image's."
    )
    auto_remove: bool = option(False, help="Let Docker remove the container when it exits, as docker run --rm does.")
    keep: bool = option(False, help="Keep the container after the trace instead of removing it.")
    config: dict[str, Any] = option(
        {}, help="Extra fields of the Docker Engine API create body (Config), merged last, for settings not listed here."
    )
    host_config: dict[str, Any] = option(
        {}, help="Extra fields of the create body's HostConfig, merged last, such as {ShmSize = 268435456}."
    )


def parse_launch(raw: Mapping[str, Any]) -> LaunchOptions:
    """Validate a ``launch`` table. Raises OptionError whose key path starts with ``launch``."""
    try:
        options = build_options(LaunchOptions, raw)
    except OptionError as exc:
        raise OptionError(str(exc), "launch." + exc.key_path) from None
    if options.healthcheck:
        try:
            build_options(Healthcheck, options.healthcheck)
        except OptionError as exc:
            raise OptionError(str(exc), "launch.healthcheck." + exc.key_path) from None
    for index, port in enumerate(options.ports):
        if not _valid_port(port):
            raise OptionError(
                f'invalid port {port!r}: write "HOST:CONTAINER", "HOST:CONTAINER/udp" or "IP:HOST:CONTAINER"',
                f"launch.ports[{index}]",
            )
    if options.seccomp == "":
        raise OptionError('seccomp must not be empty: write "log", "default", "unconfined" or a path', "launch.seccomp")
    return options


def healthcheck_of(options: LaunchOptions) -> Healthcheck | None:
    """Return the validated health check, or None when the image's is kept."""
    return build_options(Healthcheck, options.healthcheck) if options.healthcheck else None


def _valid_port(text: str) -> bool:
    spec, _, protocol = text.partition("/")
    if protocol not in ("", "tcp", "udp", "sctp"):
        return False
    parts = spec.rsplit(":", 2)
    if len(parts) < 2:
        return parts[0].isdigit()
    return parts[-1].isdigit() and (parts[-2] == "" or parts[-2].isdigit())
