"""``components``: list every component type with its options and event types."""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from speaker.engine import ExitCode
from speaker.options import option_specs
from speaker.registry import KINDS, ComponentNotFound, all_components, resolve


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "components",
        parents=[common],
        help="list component types, their options and event types",
        description="Print every built-in and installed component, read from the schemas the validator uses.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("type", nargs="?", help="print only this type")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    components, errors = all_components()
    for error in errors:
        print(f"warning: {error}", file=sys.stderr)
    if args.type and ":" in args.type:
        components = _resolve_import_path(args.type)
    entries = []
    for section, type_name, cls in components:
        if args.type and type_name != args.type:
            continue
        entries.append(
            {
                "section": section,
                "type": type_name,
                "summary": (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " "),
                "accepts": [event.__name__ for event in cls.accepts],
                "emits": [event.__name__ for event in cls.emits],
                "options": [
                    {
                        "name": spec.name,
                        "type": spec.type_text,
                        "default": None if spec.required else spec.default_text,
                        "required": spec.required,
                        "help": spec.help,
                    }
                    for spec in option_specs(cls.Options)
                ],
            }
        )
    if args.type and not entries:
        print(f"error: no component type named {args.type!r}; run without a type to list all", file=sys.stderr)
        return ExitCode.USAGE
    if args.json:
        print(json.dumps(entries, indent=2))
        return ExitCode.OK
    for entry in entries:
        print(f"[{entry['section']}] {entry['type']}: {entry['summary']}")
        if entry["accepts"]:
            print(f"    accepts: {', '.join(entry['accepts'])}")
        if entry["emits"]:
            print(f"    emits:   {', '.join(entry['emits'])}")
        for option in entry["options"]:
            default = "required" if option["required"] else f"default {option['default']}"
            print(f"    {option['name']} ({option['type']}, {default})")
            print(f"        {option['help']}")
        print()
    return ExitCode.OK


def _resolve_import_path(path: str) -> list[tuple[str, str, type]]:
    """Return the component an import path names, under each kind it belongs to."""
    found = []
    for section in KINDS:
        try:
            found.append((section, path, resolve(section, path)))
        except ComponentNotFound:
            continue
    return found
