"""Docker and OCI seccomp JSON: write a filter plan, read a profile.

Docker's ``--security-opt seccomp=FILE`` format and the OCI runtime spec's
``linux.seccomp`` object share their fields (defaultAction, defaultErrnoRet,
architectures, listenerPath, listenerMetadata, and syscalls with names,
action and errnoRet). Docker also accepts a ``comment`` per rule, which the
``oci`` flavor leaves out.

Both formats apply one list of names to every listed architecture, so they
cannot express "x86 allows only the invariants". The writer therefore lists only
the architectures that the profile has syscalls for. runc (1.1.5, checked by
reading the filter it loaded into a container) kills the thread for any
other architecture, so those stay denied, with kill-thread rather than the
default action. When several architectures are listed, each gets the union
of their names, which is less strict than the compiled BPF; the writer
returns a warning saying so.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from speaker.compile.actions import ALLOW, NOTIFY, Action, ActionKind
from speaker.compile.arches import (
    KNOWN_ARCHES,
    SCMP_ARCH_CONSTANTS,
    SCMP_ARCH_NAMES,
    host_arches,
    syscall_table,
)
from speaker.compile.plan import INVARIANTS, FilterPlan, Layout
from speaker.events import PHASES
from speaker.profiles.errors import NESTED_TOO_DEEPLY, ProfileError, line_of, shorten_name, unknown_name_message
from speaker.profiles.files import read_text
from speaker.profiles.model import Profile

Flavor = Literal["docker", "oci"]

#: Syscalls that runc and youki reject with SCMP_ACT_NOTIFY ("SCMP_ACT_NOTIFY
#: cannot be used for the write syscall"): runc writes to its parent after
#: loading the filter, before any supervisor could reply to a notification.
NEVER_NOTIFIED: frozenset[str] = frozenset({"write"})


@dataclasses.dataclass
class SeccompJson:
    """A Docker or OCI seccomp profile and the warnings about what it cannot express."""

    data: dict[str, Any]
    warnings: list[str]

    def text(self) -> str:
        return json.dumps(self.data, indent=2) + "\n"


def plan_to_json(
    plan: FilterPlan,
    *,
    flavor: Flavor = "docker",
    listener_path: str = "",
    listener_metadata: str = "",
) -> SeccompJson:
    """Express ``plan`` as a Docker (or OCI) seccomp profile.

    A notify-layout plan needs ``listener_path``, the supervisor's socket,
    because runc rejects SCMP_ACT_NOTIFY rules without one.
    """
    warnings: list[str] = []
    arches = plan.listed_arches or plan.arches[:1]
    if len(arches) > 1:
        differing = _differing_names(plan, arches)
        if differing:
            warnings.append(
                f"Docker and OCI profiles apply one list to {', '.join(arches)}, so each of them allows "
                f"{len(differing)} syscalls that only another one was traced with (the compiled BPF keeps them apart)"
            )
    data: dict[str, Any] = {"defaultAction": plan.default_action.scmp}
    if plan.default_action.kind is ActionKind.ERRNO:
        data["defaultErrnoRet"] = plan.default_action.errno
    data["architectures"] = [SCMP_ARCH_CONSTANTS[arch] for arch in arches]
    notified = plan.names_with(Action(ActionKind.NOTIFY))
    if notified:
        if not listener_path:
            raise ValueError("a notify-layout profile needs the supervisor's socket path (listenerPath)")
        data["listenerPath"] = listener_path
        if listener_metadata:
            data["listenerMetadata"] = listener_metadata
    names_by_action = {
        action: set().union(*(plan.names_with(action, arch) for arch in arches)) for action in plan.rule_actions
    }
    moved = names_by_action.get(NOTIFY, set()) & NEVER_NOTIFIED
    if moved:
        names_by_action[NOTIFY] -= moved
        names_by_action.setdefault(ALLOW, set()).update(moved)
        warnings.append(
            f"{', '.join(sorted(moved))} would be sent to the supervisor, but runc rejects SCMP_ACT_NOTIFY for "
            "it, so the profile allows it in every phase"
        )
    rules = []
    for action in sorted(names_by_action):
        names = sorted(names_by_action[action])
        if not names:
            continue
        rule: dict[str, Any] = {"names": names, "action": action.scmp}
        if action.kind is ActionKind.ERRNO:
            rule["errnoRet"] = action.errno
        if flavor == "docker":
            rule["comment"] = _comment(plan, action, names)
        rules.append(rule)
    data["syscalls"] = rules
    return SeccompJson(data, warnings)


def _comment(plan: FilterPlan, action: Action, names: list[str]) -> str:
    invariant_names = {name for name, value in plan.invariants.items() if value == action}
    if invariant_names and invariant_names >= set(names):
        reasons = sorted({item.name for item in INVARIANTS.values() if set(item.syscalls) & invariant_names})
        return "SPEAKER safety invariants: " + ", ".join(reasons)
    if action.kind is ActionKind.NOTIFY:
        return "decided by the SPEAKER supervisor according to the current phase"
    where = f"the {plan.phase} phase" if plan.phase else f"the {plan.layout} layout"
    extra = f", plus the safety invariants {', '.join(sorted(invariant_names))}" if invariant_names else ""
    return f"traced syscalls of {where}{extra}"


def _differing_names(plan: FilterPlan, arches: Iterable[str]) -> set[str]:
    """Return the listed names (invariants aside) that some of ``arches`` have and others lack."""
    per_arch = [set(plan.rules.get(arch, {})) - set(plan.invariants) for arch in arches]
    return set().union(*per_arch) - set.intersection(*per_arch)


def write_json(document: SeccompJson, path: Path) -> None:
    from speaker.profiles.speaker_lists import write_atomic

    write_atomic(path, document.text())


# --- Reading -----------------------------------------------------------------


def is_seccomp_json(data: Any) -> bool:
    return isinstance(data, dict) and "defaultAction" in data


def read_seccomp_json(path: Path, *, strict: bool = True) -> Profile:
    """Read a Docker or OCI seccomp profile (or a config.json with ``linux.seccomp``) as a profile.

    The allowed names become all three phases, on each listed host arch that
    has them. With ``strict`` (the default), names libseccomp does not know,
    duplicate names and argument conditions are errors. Otherwise they are
    skipped or relaxed and the profile's notes record it, which suits reading
    a baseline written for a newer libseccomp.
    """
    text = read_text(path, "a seccomp profile")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from None
    except RecursionError:
        raise ProfileError(NESTED_TOO_DEEPLY, path=path) from None
    if isinstance(data, dict) and isinstance(data.get("linux"), dict) and "seccomp" in data["linux"]:
        data = data["linux"]["seccomp"]
    if not is_seccomp_json(data):
        raise ProfileError(
            'not a seccomp profile: a Docker or OCI profile is a JSON object with "defaultAction"', path=path
        )
    return _Reader(text, path, strict).profile(data)


class _Reader:
    def __init__(self, text: str, path: Path, strict: bool) -> None:
        self.text = text
        self.path = path
        self.strict = strict

    def error(self, message: str, needle: str | None = None) -> ProfileError:
        return ProfileError(message, path=self.path, line=line_of(self.text, needle) if needle else None)

    def profile(self, data: dict[str, Any]) -> Profile:
        try:
            default_errno = _errno_value(data, "defaultErrnoRet")
        except ValueError as exc:
            raise self.error(str(exc), '"defaultErrnoRet"') from None
        try:
            default = Action.from_scmp(str(data["defaultAction"]), default_errno)
        except ValueError as exc:
            raise self.error(str(exc), '"defaultAction"') from None
        if default.kind in (ActionKind.ALLOW, ActionKind.LOG):
            raise self.error(
                f"defaultAction {default.kind.value} makes this a deny-list, not an allow-list: "
                "SPEAKER profiles list what is allowed",
                '"defaultAction"',
            )
        arches = self.arches(data)
        profile = Profile()
        notes = [f"read from the seccomp profile {self.path}; one list applies to all three phases"]
        allowed: dict[str, int] = {}
        for index, rule in enumerate(self.list_of(data, "syscalls")):
            self.rule(rule, index, allowed, notes)
        if not allowed:
            raise self.error("the profile allows no syscalls, so every phase would be empty", '"syscalls"')
        for name in sorted(allowed):
            homes = [arch for arch in arches if syscall_table(arch).number(name) is not None]
            if not homes:
                self.unknown(name, arches, notes)
                continue
            for arch in homes:
                for phase in PHASES:
                    profile.add(arch, phase, name)
        profile.notes.extend(notes)
        return profile

    def arches(self, data: dict[str, Any]) -> list[str]:
        constants = list(self.list_of(data, "architectures"))
        for entry in self.list_of(data, "archMap"):
            if isinstance(entry, dict):
                constants.append(entry.get("architecture"))
                constants.extend(self.list_of(entry, "subArchitectures"))
        if not constants:
            return [host_arches()[0]]
        names = []
        for constant in constants:
            name = SCMP_ARCH_NAMES.get(str(constant))
            if name is None and constant != "SCMP_ARCH_NATIVE":
                raise self.error(
                    f"unknown architecture {_shorten(constant)}: expected an SCMP_ARCH_* constant such as SCMP_ARCH_X86_64",
                    f'"{constant}"',
                )
            names.append(host_arches()[0] if constant == "SCMP_ARCH_NATIVE" else name)
        host = [arch for arch in host_arches() if arch in names]
        if not host:
            foreign = ", ".join(sorted({name for name in names if name in KNOWN_ARCHES}))
            raise self.error(
                f"this profile is for {foreign}, but this host enforces only {', '.join(host_arches())}",
                '"architectures"',
            )
        return host

    def list_of(self, data: dict[str, Any], key: str) -> list[Any]:
        """Return the list under ``key``, an empty list when it is absent or null, or raise ProfileError."""
        value = data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"{key!r} must be a list, got {_shorten(value)}", f'"{key}"')
        return value

    def rule(self, rule: Any, index: int, allowed: dict[str, int], notes: list[str]) -> None:
        if not isinstance(rule, dict):
            raise self.error(f"syscalls[{index}] must be an object with names and action", '"syscalls"')
        names = rule.get("names")
        if names is None and isinstance(rule.get("name"), str):
            names = [rule["name"]]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise self.error(f"syscalls[{index}].names must be a list of syscall names", '"syscalls"')
        try:
            action = Action.from_scmp(str(rule.get("action")), _errno_value(rule, "errnoRet"))
        except ValueError as exc:
            raise self.error(f"syscalls[{index}]: {exc}", f'"{rule.get("action")}"') from None
        if action.kind is ActionKind.NOTIFY:
            raise self.error(
                "this is a notify-layout profile: it does not record which phase each notified syscall "
                "belongs to. Read the profile.json or the phase files it was made from",
                '"SCMP_ACT_NOTIFY"',
            )
        if action.kind is not ActionKind.ALLOW:
            return
        if rule.get("args"):
            if self.strict:
                raise self.error(
                    f"syscalls[{index}] allows {', '.join(names)} only for some argument values; "
                    "SPEAKER profiles allow whole syscalls. Remove the args to allow them always",
                    '"args"',
                )
            notes.append(f"argument conditions on {', '.join(names)} were dropped: they count as allowed")
        if rule.get("includes") or rule.get("excludes"):
            notes.append(f"includes/excludes conditions on {', '.join(names)} were treated as met")
        for name in names:
            if name in allowed:
                if self.strict:
                    raise self.error(
                        f"duplicate syscall {shorten_name(name)}: it is allowed by syscalls[{allowed[name]}] and syscalls[{index}]",
                        f'"{name}"',
                    )
                continue
            allowed[name] = index

    def unknown(self, name: str, arches: list[str], notes: list[str]) -> None:
        message = unknown_name_message(name, arches[0])
        if self.strict:
            raise self.error(message, f'"{name}"')
        notes.append(f"skipped {name}: {message}")


def _errno_value(data: dict[str, Any], key: str) -> int | None:
    """Return the errno number under ``key``, or None when absent. Raises ValueError for another type."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an errno number such as 1 (EPERM), got {_shorten(value)}")
    return value


def _shorten(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:60]}... ({len(text)} characters)"


__all__ = ["Flavor", "Layout", "SeccompJson", "plan_to_json", "read_seccomp_json", "write_json"]
