"""Build the Docker Engine API body that creates a launched container (POST /containers/create)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from speaker.launch.options import LaunchOptions, healthcheck_of

_NANOSECONDS = 1_000_000_000


def create_body(options: LaunchOptions, *, security_opt: list[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """Return the create body for ``options``.

    ``security_opt`` contains the seccomp entry from ``security_options``.
    ``labels`` are added to the user's labels (SPEAKER marks its containers).
    The ``config`` and ``host_config`` options are merged last.
    """
    body: dict[str, Any] = {
        "Image": options.image,
        "Labels": {**options.labels, **labels},
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
    }
    optional = {
        "Cmd": options.command,
        "Entrypoint": options.entrypoint,
        "User": options.user or None,
        "WorkingDir": options.workdir or None,
        "Hostname": options.hostname or None,
        "StopTimeout": options.stop_timeout,
        "StopSignal": options.stop_signal or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if options.env:
        body["Env"] = [f"{name}={value}" for name, value in options.env.items()]
    healthcheck = healthcheck_of(options)
    if healthcheck is not None:
        body["Healthcheck"] = {
            "Test": list(healthcheck.test),
            "Interval": round(healthcheck.interval * _NANOSECONDS),
            "Timeout": round(healthcheck.timeout * _NANOSECONDS),
            "Retries": healthcheck.retries,
            "StartPeriod": round(healthcheck.start_period * _NANOSECONDS),
        }

    host: dict[str, Any] = {
        "NetworkMode": options.network,
        "SecurityOpt": [*security_opt, *options.security_opt],
        "ReadonlyRootfs": options.read_only,
        "AutoRemove": options.auto_remove,
    }
    if options.runtime:
        host["Runtime"] = options.runtime
    if options.cap_add:
        host["CapAdd"] = list(options.cap_add)
    if options.cap_drop:
        host["CapDrop"] = list(options.cap_drop)
    if options.tmpfs:
        host["Tmpfs"] = dict(_split_tmpfs(entry) for entry in options.tmpfs)
    if options.volumes:
        host["Binds"] = list(options.volumes)
    if options.ports:
        exposed, bindings = _port_bindings(options.ports)
        body["ExposedPorts"] = exposed
        host["PortBindings"] = bindings
    body["HostConfig"] = {**host, **options.host_config}
    body.update(options.config)
    return body


def _split_tmpfs(entry: str) -> tuple[str, str]:
    path, _, mount_options = entry.partition(":")
    return path, mount_options


def _port_bindings(ports: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, str]]]]:
    """Turn ``-p`` specs into ExposedPorts and PortBindings; ``parse_launch`` has checked their form."""
    exposed: dict[str, dict[str, Any]] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    for spec in ports:
        address, _, protocol = spec.partition("/")
        parts = address.rsplit(":", 2)
        container_port = parts[-1]
        host_port = parts[-2] if len(parts) >= 2 else ""
        host_ip = parts[-3] if len(parts) == 3 else ""
        key = f"{container_port}/{protocol or 'tcp'}"
        exposed[key] = {}
        bindings.setdefault(key, []).append({"HostIp": host_ip, "HostPort": host_port})
    return exposed, bindings
