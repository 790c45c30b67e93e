"""``install-runtime``: register the speaker-runtime wrapper in Docker's daemon.json."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from speaker.engine import ExitCode
from speaker.notify.delivery import DEFAULT_RUNTIME_NAME, PROFILE_DELIVERY_SINCE, parse_version
from speaker.runtime_wrapper import DEFAULT_METADATA, DEFAULT_SOCKET, missing_supervisor_message

DEFAULT_DAEMON_JSON = Path("/etc/docker/daemon.json")
DEFAULT_LAUNCHER = Path("/usr/local/lib/speaker/speaker-runtime")
DEFAULT_PIDFILE = Path("/var/run/docker.pid")

_LAUNCHER_TEMPLATE = """#!/bin/sh
# speaker-runtime launcher, written by `python -m speaker install-runtime`.
#
# On create (or run) of a bundle whose config.json has SCMP_ACT_NOTIFY rules
# and no listenerPath, it adds listenerPath (the SPEAKER supervisor's socket)
# and listenerMetadata to linux.seccomp, as speaker/runtime_wrapper.py does.
# Then it runs runc with the same arguments. It edits the text with sed
# because starting Python would add 15-25 ms to each such container start,
# and with the supervisor listening, sed is the only program it starts.
# In text written by a JSON encoder, "seccomp" followed by a colon and a
# brace can only be the key of an object, and the OCI config has one such key.
runc={runc}
socket={socket}
bundle=.
log=
log_format=text
create=
previous=
for arg do
	case "$previous" in
	--bundle | -b) bundle=$arg ;;
	--log) log=$arg ;;
	--log-format) log_format=$arg ;;
	esac
	case "$arg" in
	create | run) create=1 ;;
	--bundle=*) bundle=${{arg#--bundle=}} ;;
	--log=*) log=${{arg#--log=}} ;;
	--log-format=*) log_format=${{arg#--log-format=}} ;;
	esac
	previous=$arg
done
config=$bundle/config.json
if [ -z "$create" ]; then
	exec "$runc" "$@"
fi
if [ -S "$socket" ]; then
	# GNU sed's -z makes the whole file one pattern space, so the addresses
	# test the whole config: edit only if it notifies and has no listener.
	sed -z -i {sed_script} "$config"
elif grep -qs '"SCMP_ACT_NOTIFY"' "$config" && ! grep -qs '"listenerPath"' "$config"; then
	echo {message_shell} >&2
	if [ -n "$log" ]; then
		now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
		if [ "$log_format" = json ]; then
			printf '{{"level":"error","msg":"%s","time":"%s"}}\\n' {message_json} "$now" >>"$log"
		else
			printf 'time="%s" level=error msg="%s"\\n' "$now" {message_json} >>"$log"
		fi
	fi
	exit 1
fi
exec "$runc" "$@"
"""


class InstallError(Exception):
    """A failed installation step. The message gives the fix."""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "install-runtime",
        parents=[common],
        help="register the speaker-runtime OCI wrapper with Docker (needed before Docker 23)",
        description="Add a runtime entry for speaker-runtime to Docker's daemon.json, keeping every other "
        "setting, so that `docker run --runtime NAME` gives runc the supervisor's socket. Docker 20.10 drops "
        "listenerPath from seccomp profiles; Docker 23 and later keep it and need no wrapper.",
    )
    parser.add_argument("--name", default=DEFAULT_RUNTIME_NAME, help="runtime name for `docker run --runtime` (default: %(default)s)")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the supervisor's socket (default: %(default)s)")
    parser.add_argument("--runc", default="runc", help="runc binary the wrapper executes (default: runc on PATH)")
    parser.add_argument(
        "--launcher",
        choices=("shell", "console-script"),
        default="shell",
        help="what Docker starts: a /bin/sh launcher that edits config.json with sed and starts no Python "
        "(the default, about 4 ms per container), or the speaker-runtime console script for every runc command",
    )
    parser.add_argument(
        "--launcher-path",
        type=Path,
        default=DEFAULT_LAUNCHER,
        help="where to write the shell launcher (default: %(default)s)",
    )
    parser.add_argument(
        "--daemon-json", type=Path, default=DEFAULT_DAEMON_JSON, help="Docker's daemon configuration (default: %(default)s)"
    )
    parser.add_argument(
        "--reload",
        action="store_true",
        help="send SIGHUP to dockerd (pid from --pidfile), which reloads runtimes without a restart",
    )
    parser.add_argument("--pidfile", type=Path, default=DEFAULT_PIDFILE, help="dockerd's pid file (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the new daemon.json and change nothing")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        return install(args)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.FAILED


def install(args: argparse.Namespace) -> int:
    report_docker_version()
    runc = shutil.which(args.runc)
    if runc is None:
        raise InstallError(f"runc binary {args.runc!r} not found; install runc or pass --runc PATH")
    if args.launcher == "shell":
        entry: dict[str, Any] = {"path": str(args.launcher_path)}
        launcher_text = launcher_script(args.socket, runc)
    else:
        console = shutil.which("speaker-runtime")
        if console is None:
            raise InstallError(
                "the speaker-runtime console script is not on PATH; reinstall the package or use --launcher shell"
            )
        entry = {"path": console, "runtimeArgs": ["--speaker-socket", args.socket, "--speaker-runc", runc]}
        launcher_text = ""

    config = read_daemon_json(args.daemon_json)
    runtimes = config.setdefault("runtimes", {})
    if not isinstance(runtimes, dict):
        raise InstallError(f"{args.daemon_json}: 'runtimes' is not an object; fix the file by hand first")
    previous = runtimes.get(args.name)
    runtimes[args.name] = entry
    text = json.dumps(config, indent=2) + "\n"
    if args.dry_run:
        if launcher_text:
            print(f"# {args.launcher_path}\n{launcher_text}")
        print(f"# {args.daemon_json}\n{text}", end="")
        return ExitCode.OK

    if launcher_text:
        if launcher_current(args.launcher_path, launcher_text):
            print(f"{args.launcher_path} is up to date")
        else:
            write_launcher(args.launcher_path, launcher_text)
            print(f"wrote {args.launcher_path}")
    if previous == entry:
        print(f"{args.daemon_json} already registers runtime {args.name!r}")
    else:
        write_atomic(args.daemon_json, text)
        action = "updated" if previous is not None else "added"
        print(f"{action} runtime {args.name!r} in {args.daemon_json}; other settings are unchanged")
    if args.reload and previous == entry and dockerd_runtime_path(args.name) == entry["path"]:
        # A SIGHUP makes dockerd reread its whole configuration, so it is sent only when something changed.
        print(f"dockerd already has runtime {args.name!r}; no reload needed")
    elif args.reload:
        reload_dockerd(args.pidfile, args.name)
    else:
        print(f"reload dockerd to use it: kill -HUP $(cat {args.pidfile})   (SIGHUP reloads runtimes; no restart)")
    print(f"then start containers with: docker run --runtime {args.name} --security-opt seccomp=PROFILE.json ...")
    return ExitCode.OK


def launcher_script(socket: str, runc: str) -> str:
    """Return the /bin/sh launcher for ``socket`` and ``runc``, with every value quoted for sh, JSON and sed.

    The listenerMetadata it adds names the program that added the listener
    (``speaker-runtime``, as the console script sends), not the runtime entry
    from ``--name``: the supervisor only logs it in ``listener_attached``.
    """
    fields = (
        json.dumps("listenerPath")
        + ":"
        + json.dumps(socket)
        + ","
        + json.dumps("listenerMetadata")
        + ":"
        + json.dumps(DEFAULT_METADATA)
        + ","
    )
    replacement = fields.replace("\\", "\\\\").replace("&", "\\&").replace("|", "\\|")
    message = missing_supervisor_message(socket)
    return _LAUNCHER_TEMPLATE.format(
        runc=shlex.quote(runc),
        socket=shlex.quote(socket),
        message_shell=shlex.quote(message),
        # The message inside a JSON string: json.dumps without its quotes.
        message_json=shlex.quote(json.dumps(message)[1:-1]),
        sed_script=shlex.quote(
            f'/"SCMP_ACT_NOTIFY"/{{/"listenerPath"/!s|"seccomp"[[:space:]]*:[[:space:]]*{{|&{replacement}|}}'
        ),
    )


def report_docker_version() -> None:
    """Print whether this Docker needs the wrapper. An unreachable Docker is not an error here."""
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        print("note: cannot ask Docker for its version; installing anyway")
        return
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        print("note: cannot ask Docker for its version; installing anyway")
        return
    try:
        needs_wrapper = parse_version(version) < PROFILE_DELIVERY_SINCE
    except ValueError:
        print(f"note: unrecognized Docker version {version!r}; installing anyway")
        return
    if needs_wrapper:
        print(f"Docker {version} drops listenerPath from seccomp profiles, so it needs the wrapper")
    else:
        since = ".".join(map(str, PROFILE_DELIVERY_SINCE))
        print(f"note: Docker {version} (>= {since}) keeps listenerPath from the profile; the wrapper is optional")


def read_daemon_json(path: Path) -> dict[str, Any]:
    """Read daemon.json, or return {} when it does not exist. Raises InstallError for invalid JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from exc
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InstallError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix it before adding a runtime") from exc
    if not isinstance(data, dict):
        raise InstallError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_launcher(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text, mode=0o755)
    except OSError as exc:
        raise InstallError(f"cannot write the launcher {path}: {exc.strerror}") from exc


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` through a temporary file, keeping its mode unless ``mode`` is given."""
    if mode is None:
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    temporary = path.with_name(f".{path.name}.speaker-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text, encoding="utf-8")
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InstallError(f"cannot write {path}: {exc.strerror}") from exc


def launcher_current(path: Path, text: str) -> bool:
    """Return whether the launcher at ``path`` already has ``text`` and is executable."""
    try:
        return path.read_text(encoding="utf-8") == text and os.access(path, os.X_OK)
    except (OSError, UnicodeDecodeError):
        return False


def dockerd_runtime_path(name: str) -> str | None:
    """Return the path of runtime ``name`` that the running dockerd uses, or None when it has none or cannot be asked."""
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True, timeout=10
        )
        runtimes = json.loads(result.stdout or "{}") if result.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None
    runtime = runtimes.get(name) if isinstance(runtimes, dict) else None
    return runtime.get("path") if isinstance(runtime, dict) else None


def reload_dockerd(pidfile: Path, name: str, timeout: float = 10.0) -> None:
    """Send SIGHUP to dockerd and wait until ``docker info`` lists the runtime."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read dockerd's pid from {pidfile}: {exc}; pass --pidfile or reload by hand") from exc
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise InstallError(f"cannot send SIGHUP to dockerd (pid {pid}): {exc.strerror}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True, timeout=10
        )
        if result.returncode == 0 and name in json.loads(result.stdout or "{}"):
            print(f"dockerd (pid {pid}) reloaded; runtime {name!r} is available")
            return
        time.sleep(0.2)
    raise InstallError(
        f"sent SIGHUP to dockerd (pid {pid}), but after {timeout:.0f} s `docker info` does not list runtime {name!r}; "
        "check dockerd's log"
    )
