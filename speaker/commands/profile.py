"""``profile show|merge|diff|export|baseline``: inspect, combine and convert profiles."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from speaker.compile import INVARIANTS, Action, CompileSettings, EmptyPhase, FilterPlan, Layout, UnknownSyscall, plan_layout
from speaker.compile.arches import host_arches
from speaker.engine import ExitCode
from speaker.events import Phase
from speaker.profiles import ProfileError, diff_profiles, load_profile, merge_profiles, write_profile_dir
from speaker.profiles.baseline import BaselineError, baseline_json, docker_default_baseline
from speaker.profiles.docker_json import plan_to_json
from speaker.profiles.files import os_reason
from speaker.profiles.model import Profile
from speaker.profiles.show import render_show, show_data
from speaker.profiles.spo import dump_yaml, object_name, plan_to_spo
from speaker.profiles.speaker_lists import write_atomic

DOCKER_DEFAULT = "docker-default"
EXPORT_TARGETS = ("booting", "running", "shutdown", "union", "notify", "notify-exact")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "profile",
        parents=[common],
        help="show, merge, diff and export profiles",
        description="Inspect and convert profiles. PROFILE is a profile directory, a profile.json or a Docker seccomp JSON.",
    )
    actions = parser.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    compile_options = _compile_options_parser()

    show = actions.add_parser(
        "show",
        parents=[common, compile_options],
        help="per-phase counts, what each phase adds and removes, and reductions",
        description="Print a table of per-phase syscall counts, the syscalls each phase adds and removes, "
        "and how many fewer syscalls each phase allows than the union of all phases and than a baseline.",
    )
    show.add_argument("profile", metavar="PROFILE")
    show.add_argument(
        "--baseline",
        metavar="PROFILE",
        help=f"profile to compare with, such as a Docker seccomp JSON; '{DOCKER_DEFAULT}' reads Docker's "
        "default profile from a container started for the purpose (needs root and Docker)",
    )
    show.add_argument("--baseline-image", metavar="IMAGE", help=f"image to start for '{DOCKER_DEFAULT}' (default: the profile's image)")
    show.add_argument("--arch", choices=host_arches(), help="compare the names of one architecture (default: all together)")
    show.add_argument("--json", action="store_true", help="print JSON instead of the table")
    show.set_defaults(handler=handle_show)

    merge = actions.add_parser(
        "merge",
        parents=[common, compile_options],
        help="phase-wise union of several profiles",
        description="Write a profile directory whose every phase is the union of the inputs' phases. "
        "Counts are summed and every input trace is kept as provenance.",
    )
    merge.add_argument("profiles", metavar="PROFILE", nargs="+")
    merge.add_argument("-o", "--output", required=True, metavar="DIR", help="profile directory to write")
    merge.set_defaults(handler=handle_merge)

    diff = actions.add_parser(
        "diff", parents=[common], help="what profile B adds to and removes from profile A, per phase"
    )
    diff.add_argument("first", metavar="A")
    diff.add_argument("second", metavar="B")
    diff.add_argument("--json", action="store_true", help="print JSON instead of text")
    diff.add_argument("--exit-code", action="store_true", help="exit with 1 when the profiles differ, as `git diff --exit-code` does")
    diff.set_defaults(handler=handle_diff)

    export = actions.add_parser(
        "export",
        parents=[common, compile_options],
        help="convert a profile to Docker, OCI, Kubernetes SPO or SPEAKER format",
        description="docker: a file for `docker run --security-opt seccomp=FILE`; oci: the linux.seccomp object "
        "of an OCI config.json; spo: a Security Profiles Operator SeccompProfile (YAML); speaker: a profile directory.",
    )
    export.add_argument("profile", metavar="PROFILE")
    export.add_argument("--format", required=True, choices=("docker", "oci", "spo", "speaker"))
    export.add_argument(
        "--phase",
        choices=EXPORT_TARGETS,
        default="union",
        help="what the exported filter allows: one phase, the union of all (default), or a notify layout (docker, oci)",
    )
    export.add_argument("-o", "--output", metavar="PATH", help="file (or directory for speaker) to write; default standard output")
    export.add_argument("--listener-path", default="", help="supervisor socket for the notify layouts (listenerPath)")
    export.add_argument("--listener-metadata", default="", help="opaque string passed to the supervisor (listenerMetadata)")
    export.add_argument("--name", help="metadata.name of the SeccompProfile (default: from the image name)")
    export.add_argument("--api-version", choices=("v1", "v1beta1"), default="v1", help="SeccompProfile API version (default v1)")
    export.set_defaults(handler=handle_export)

    baseline = actions.add_parser(
        "baseline",
        parents=[common],
        help="write Docker's default profile, as this host enforces it, as a Docker seccomp JSON",
        description="Start IMAGE under Docker's default seccomp profile, read the filter runc loaded into it, "
        "and write the syscalls it allows (with zero arguments) as a Docker seccomp JSON. Needs root and Docker.",
    )
    baseline.add_argument("-o", "--output", required=True, metavar="FILE")
    baseline.add_argument("--image", required=True, help="image to start; it must keep running for a moment")
    baseline.add_argument("--container-name", default="", help="name of the short-lived container (default: random)")
    baseline.set_defaults(handler=handle_baseline)


def _compile_options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("compiled filters")
    group.add_argument(
        "--default-action",
        choices=("kill-process", "errno", "log"),
        default="kill-process",
        help="action for syscalls no list names (default kill-process)",
    )
    group.add_argument("--errno", default="EPERM", help="errno for --default-action errno, such as EPERM or 1 (default EPERM)")
    group.add_argument(
        "--no-invariant",
        action="append",
        default=[],
        choices=tuple(INVARIANTS),
        metavar="NAME",
        help=f"switch off one safety invariant ({', '.join(INVARIANTS)}); repeatable",
    )
    group.add_argument(
        "--arch-lists",
        choices=("observed", "shared"),
        default="observed",
        help="observed: each architecture allows what was traced on it; shared: all allow the union",
    )
    return parser


def _settings(args: argparse.Namespace) -> CompileSettings:
    text = f"errno:{args.errno}" if args.default_action == "errno" else args.default_action
    return CompileSettings(
        default_action=Action.parse(text),
        invariants=tuple(name for name in INVARIANTS if name not in args.no_invariant),
        arch_lists=args.arch_lists,
    )


def _fail(message: str, code: ExitCode = ExitCode.USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return int(code)


def _load(path: str, *, strict: bool = True) -> Profile:
    return load_profile(Path(path), strict=strict)


def _check_file_output(output: str, hint: str = "") -> None:
    """Raise ValueError when ``-o`` names a directory, before anything is computed or written."""
    if os.path.isdir(output):
        raise ValueError(f"{output}: is a directory; pass a file name to -o{hint}")


def _check_directory_output(output: str) -> None:
    """Raise ValueError when ``-o`` names something other than a directory that already exists."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ValueError(f"{output}: is a file, not a directory; pass a new or existing directory to -o")


def _write_failed(output: str, exc: OSError) -> int:
    return _fail(f"{output}: cannot write: {os_reason(exc)}")


# --- show --------------------------------------------------------------------


def handle_show(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        profile = _load(args.profile)
        baseline, label = _baseline(args, profile)
        data = show_data(profile, settings, baseline=baseline, baseline_label=label, arch=args.arch)
    except (ProfileError, UnknownSyscall, ValueError) as exc:
        return _fail(str(exc))
    except BaselineError as exc:
        return _fail(str(exc), ExitCode.FAILED)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(render_show(data, args.profile))
    return ExitCode.OK


def _baseline(args: argparse.Namespace, profile: Profile) -> tuple[frozenset[str] | None, str]:
    if not args.baseline:
        return None, ""
    arch = args.arch or host_arches()[0]
    if args.baseline == DOCKER_DEFAULT:
        image = args.baseline_image or (profile.images[0] if profile.images else "")
        if not image:
            raise ValueError(f"--baseline {DOCKER_DEFAULT} needs --baseline-image, because the profile names no image")
        baseline = docker_default_baseline(image)
        return baseline.union(arch), f"Docker {baseline.traces[0].docker_version} default profile, {arch}"
    baseline = _load(args.baseline, strict=False)
    return baseline.union(arch), f"{args.baseline}, {arch}"


# --- merge -------------------------------------------------------------------


def handle_merge(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        _check_directory_output(args.output)
        _check_different_paths(args.profiles)
        profiles = [_load(path) for path in args.profiles]
        merged = merge_profiles(profiles, args.profiles)
    except (ProfileError, ValueError) as exc:
        return _fail(str(exc))
    images = {image for profile in profiles for image in profile.images}
    if len(images) > 1:
        print(f"warning: merging profiles of different images: {', '.join(sorted(images))}", file=sys.stderr)
    try:
        written = write_profile_dir(merged, Path(args.output), settings)
    except OSError as exc:
        return _write_failed(args.output, exc)
    for warning in written.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    counts = ", ".join(f"{phase} {len(merged.phase(phase))}" for phase in Phase)
    complete = "yes" if merged.complete else "no"
    if not merged.traces:
        # A merge of list directories and seccomp JSON records no trace to judge by.
        complete = "unknown"
    print(f"wrote {args.output}: {counts} syscalls, {len(merged.traces)} traces, complete: {complete}")
    return ExitCode.OK


def _check_different_paths(paths: list[str]) -> None:
    """Raise ValueError when two arguments name the same file or directory, whose counts a merge would double."""
    seen: dict[tuple[int, int], int] = {}
    for index, path in enumerate(paths):
        try:
            info = os.stat(path)
        except OSError:
            continue  # load_profile reports it with a better message.
        first = seen.setdefault((info.st_dev, info.st_ino), index)
        if first != index:
            raise ValueError(f"{paths[first]} and {path} are the same profile: merging it twice would double its counts")


# --- diff --------------------------------------------------------------------


def handle_diff(args: argparse.Namespace) -> int:
    try:
        first, second = _load(args.first), _load(args.second)
    except (ProfileError, ValueError) as exc:
        return _fail(str(exc))
    diffs = diff_profiles(first, second)
    differ = any(item.added or item.removed or item.moved for item in diffs)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "phase": item.phase.value,
                        "added": sorted(item.added),
                        "removed": sorted(item.removed),
                        "arch_changes": {name: {"a": list(a), "b": list(b)} for name, (a, b) in item.moved.items()},
                    }
                    for item in diffs
                ],
                indent=2,
            )
        )
    else:
        print(f"--- {args.first}\n+++ {args.second}")
        for item in diffs:
            print(f"{item.phase}: {len(first.phase(item.phase))} -> {len(second.phase(item.phase))} syscalls")
            for name in sorted(item.added):
                print(f"  + {name}")
            for name in sorted(item.removed):
                print(f"  - {name}")
            for name, (before, after) in item.moved.items():
                print(f"  ~ {name}: {', '.join(before)} -> {', '.join(after)}")
    return ExitCode.FAILED if differ and args.exit_code else ExitCode.OK


# --- export ------------------------------------------------------------------


def handle_export(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        if args.output and args.format != "speaker":
            _check_file_output(args.output, ", or use --format speaker to write a directory")
        if args.phase in ("notify", "notify-exact") and args.format in ("docker", "oci") and not args.listener_path:
            raise ValueError(
                f"--phase {args.phase} needs --listener-path, the supervisor's socket, which the profile names as listenerPath"
            )
        profile = _load(args.profile)
        if args.format == "speaker":
            return _export_speaker(args, profile, settings)
        plan = _export_plan(profile, args.phase, settings)
        if args.format == "spo":
            name = args.name or object_name(f"{(profile.images or ('speaker',))[0]}-{args.phase}")
            annotations = {"speaker/phase": args.phase, "speaker/complete": "true" if profile.complete else "false"}
            resource, warnings = plan_to_spo(plan, name, api_version=args.api_version, annotations=annotations)
            text = dump_yaml(resource)
        else:
            document = plan_to_json(
                plan, flavor=args.format, listener_path=args.listener_path, listener_metadata=args.listener_metadata
            )
            text, warnings = document.text(), document.warnings
    except (ProfileError, UnknownSyscall, EmptyPhase, ValueError) as exc:
        return _fail(str(exc))
    except RuntimeError as exc:
        return _fail(str(exc), ExitCode.FAILED)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not profile.complete:
        print(f"warning: the profile is incomplete: {'; '.join(profile.problems)}", file=sys.stderr)
    if args.output:
        try:
            write_atomic(Path(args.output), text)
        except OSError as exc:
            return _write_failed(args.output, exc)
    else:
        sys.stdout.write(text)
    return ExitCode.OK


def _export_plan(profile: Profile, target: str, settings: CompileSettings) -> FilterPlan:
    lists = profile.lists()
    if target in ("union", "notify", "notify-exact"):
        return plan_layout(lists, Layout(target), settings)
    return plan_layout(lists, Layout.PHASE, settings, Phase(target))


def _export_speaker(args: argparse.Namespace, profile: Profile, settings: CompileSettings) -> int:
    if not args.output:
        return _fail("--format speaker writes a directory: pass -o DIR")
    try:
        _check_directory_output(args.output)
        written = write_profile_dir(profile, Path(args.output), settings, listener_path=args.listener_path)
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _write_failed(args.output, exc)
    for warning in written.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {len(written.files)} files to {args.output}")
    return ExitCode.OK


# --- baseline ----------------------------------------------------------------


def handle_baseline(args: argparse.Namespace) -> int:
    try:
        _check_file_output(args.output)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        profile = docker_default_baseline(args.image, container_name=args.container_name)
    except (BaselineError, OSError) as exc:
        return _fail(str(exc), ExitCode.FAILED)
    document = baseline_json(profile)
    try:
        write_atomic(Path(args.output), document.text())
    except OSError as exc:
        return _write_failed(args.output, exc)
    counts = ", ".join(f"{arch} {len(profile.union(arch))}" for arch in profile.arches)
    print(f"wrote {args.output}: Docker's default profile allows {counts} syscalls")
    for note in profile.notes:
        print(f"note: {note}")
    return ExitCode.OK
