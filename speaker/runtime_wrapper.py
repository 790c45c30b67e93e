"""speaker-runtime: an OCI runtime wrapper that points runc at the SPEAKER supervisor.

Docker before 23.0 drops ``listenerPath`` from a seccomp profile, and runc
1.1 then rejects SCMP_ACT_NOTIFY rules ("listenerPath is not set"). Docker
starts a registered runtime as::

    speaker-runtime [--speaker-socket PATH] [--speaker-runc PATH] \\
        --root R --log B/log.json --log-format json create --bundle B --pid-file P ID

On ``create`` (and ``run``), if the bundle's config.json has notify rules and
no listener path, this adds ``linux.seccomp.listenerPath`` (the supervisor's
socket) and ``listenerMetadata``. Then, for every command, it executes runc
with the remaining arguments unchanged.

The module imports only the standard library, so that
``python -I -S speaker/runtime_wrapper.py`` runs it without the site
initialization that costs most of Python's start time. It also avoids
importing the ``json`` package, which imports ``re`` and ``enum``: that took
17 ms of a 37 ms run on a 2-core x86_64 VM. Instead it calls the C scanner
and encoder behind ``json`` directly, and falls back to ``json`` where they
are missing.

The launcher that ``install-runtime`` writes does the same edit with sed and
starts no Python at all. This module is the ``speaker-runtime`` console
script, and the reference that the launcher's tests compare against.
"""

from __future__ import annotations

import os
import stat
import sys
import time

DEFAULT_SOCKET = "/run/speaker/supervisor.sock"
DEFAULT_RUNC = "runc"
DEFAULT_METADATA = "speaker-runtime"
#: runc's global options that take a value (runc 1.1: --root, --log, --log-format, --criu, --rootless).
_RUNC_VALUE_OPTIONS = frozenset({"--root", "--log", "--log-format", "--criu", "--rootless"})
_CREATE_COMMANDS = frozenset({"create", "run"})
NOTIFY_ACTION = "SCMP_ACT_NOTIFY"


def _load_json(text: str) -> object:
    """Parse a JSON document as ``json.loads`` would."""
    try:
        import _json

        scan = _json.make_scanner(_ScannerSettings)
        value, end = scan(text, 0)
    except (ImportError, AttributeError, TypeError):
        import json

        return json.loads(text)
    except StopIteration as exc:
        raise ValueError(f"expected a JSON value at offset {exc.value}") from None
    if text[end:].strip():
        raise ValueError(f"extra data after the JSON document at offset {end}")
    return value


def _dump_json(value: object) -> str:
    """Serialize ``value`` compactly as ``json.dumps(value, separators=(",", ":"))`` would."""
    try:
        import _json

        encode = _json.make_encoder(
            None, _reject, _json.encode_basestring_ascii, None, ":", ",", False, False, True
        )
        return "".join(encode(value, 0))
    except (ImportError, AttributeError, TypeError):
        import json

        return json.dumps(value, separators=(",", ":"))


def _reject(value: object) -> object:
    raise TypeError(f"cannot serialize {type(value).__name__} as JSON")


class _ScannerSettings:
    """The settings ``_json.make_scanner`` reads, with ``json.loads``'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


class WrapperError(Exception):
    """A create that cannot work; the message goes to runc's log, where Docker reads it."""


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split the leading ``--speaker-*`` options (from daemon.json runtimeArgs) off runc's arguments."""
    options = {"socket": DEFAULT_SOCKET, "runc": DEFAULT_RUNC, "metadata": DEFAULT_METADATA}
    index = 0
    while index < len(argv) and argv[index].startswith("--speaker-"):
        name, equals, value = argv[index][len("--speaker-") :].partition("=")
        if name not in options:
            raise WrapperError(
                f"speaker-runtime: unknown option --speaker-{name}: "
                "expected --speaker-socket, --speaker-runc or --speaker-metadata"
            )
        if not equals:
            index += 1
            if index >= len(argv):
                raise WrapperError(f"speaker-runtime: option --speaker-{name} needs a value")
            value = argv[index]
        options[name] = value
        index += 1
    return options, argv[index:]


def find_command(args: list[str]) -> int:
    """Return the index of runc's command (``create``, ``start``, ...) in ``args``, or -1 when there is none."""
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-"):
            return index
        if arg in _RUNC_VALUE_OPTIONS:
            index += 1
        index += 1
    return -1


def option_value(args: list[str], long_name: str, short_name: str = "") -> str | None:
    """Return the value of an option written ``--name V``, ``--name=V`` or ``-n V``, or None."""
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith(long_name + "="):
            return arg[len(long_name) + 1 :]
        if (arg == long_name or (short_name and arg == short_name)) and index + 1 < len(args):
            return args[index + 1]
    return None


def add_listener(config: dict, socket_path: str, metadata: str) -> bool:
    """Add the listener fields to an OCI config that has notify rules and no listener. Returns whether it did."""
    seccomp = (config.get("linux") or {}).get("seccomp")
    if not isinstance(seccomp, dict) or seccomp.get("listenerPath"):
        return False
    rules = seccomp.get("syscalls") or []
    notifies = seccomp.get("defaultAction") == NOTIFY_ACTION or any(
        isinstance(rule, dict) and rule.get("action") == NOTIFY_ACTION for rule in rules
    )
    if not notifies:
        return False
    seccomp["listenerPath"] = socket_path
    seccomp.setdefault("listenerMetadata", metadata)
    return True


def rewrite_config(bundle: str, socket_path: str, metadata: str) -> bool:
    """Add the listener to ``bundle``/config.json, replacing the file atomically. Returns whether it changed."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            config = _load_json(file.read())
    except OSError as exc:
        raise WrapperError(f"speaker-runtime: cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise WrapperError(f"speaker-runtime: {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise WrapperError(f"speaker-runtime: {path} is not a JSON object")
    if not add_listener(config, socket_path, metadata):
        return False
    if not _is_socket(socket_path):
        raise WrapperError(missing_supervisor_message(socket_path))
    temporary = f"{path}.speaker-{os.getpid()}"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(_dump_json(config))
    os.chmod(temporary, mode)
    os.replace(temporary, path)
    return True


def missing_supervisor_message(socket_path: str) -> str:
    return (
        f"speaker-runtime: the SPEAKER supervisor is not listening on {socket_path}, and this container's "
        "seccomp profile sends syscalls to it; start the enforce pipeline first "
        "(python -m speaker run pipelines/enforce.toml)"
    )


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def report_error(message: str, runc_args: list[str]) -> None:
    """Write ``message`` to stderr and, as runc would, to runc's ``--log`` file, where Docker looks for it."""
    sys.stderr.write(message + "\n")
    log_path = option_value(runc_args[: max(find_command(runc_args), 0)], "--log")
    if not log_path:
        return
    log_format = option_value(runc_args, "--log-format") or "text"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if log_format == "json":
        line = _dump_json({"level": "error", "msg": message, "time": stamp})
    else:
        line = f'time="{stamp}" level=error msg="{message}"'
    try:
        with open(log_path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        options, runc_args = split_options(args)
    except WrapperError as exc:
        report_error(str(exc), [])
        return 1
    try:
        command_index = find_command(runc_args)
        if command_index >= 0 and runc_args[command_index] in _CREATE_COMMANDS:
            command_args = runc_args[command_index + 1 :]
            bundle = option_value(command_args, "--bundle", "-b") or os.getcwd()
            rewrite_config(bundle, options["socket"], options["metadata"])
    except WrapperError as exc:
        report_error(str(exc), runc_args)
        return 1
    runc = options["runc"]
    try:
        if os.sep in runc:
            os.execv(runc, [runc, *runc_args])
        os.execvp(runc, [runc, *runc_args])
    except OSError as exc:
        report_error(f"speaker-runtime: cannot execute {runc}: {exc.strerror}", args)
        return 127
    return 0  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
