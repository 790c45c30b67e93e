"""Load and validate pipeline files before anything runs.

A pipeline file is TOML with three tables of named components and an
optional ``[pipeline]`` table of engine settings::

    [sources.audit]
    type = "audit_netlink"

    [stages.classify]
    type = "classify"
    inputs = ["audit"]

    [sinks.out]
    type = "jsonl"
    inputs = ["classify"]
    path = "events.jsonl"

``load_pipeline`` checks everything the engine relies on: known types and
options, value types, inputs that exist, no cycles, and event types that each
consumer accepts. Every error names the file, the line where it can tell,
the table and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speaker.component import Component
from speaker.options import Duration, OptionError, build_options, option
from speaker.registry import KINDS, ComponentNotFound, resolve

SECTIONS = tuple(KINDS)
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """An invalid pipeline file or override. ``str()`` gives the whole message."""

    def __init__(self, message: str, *, path: Path | str, line: int | None = None, table: str = "", key: str = ""):
        self.message = message
        self.path = str(path)
        self.line = line
        self.table = table
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        parts = [where]
        if self.table:
            parts.append(f"[{self.table}]")
        if self.key:
            parts.append(f"key {self.key!r}")
        return " ".join(parts) + ": " + self.message


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """Engine settings from the optional ``[pipeline]`` table."""

    description: str = option("", help="One line that says what the pipeline does.")
    max_batch: int = option(
        256, min=1, max=65536, help="Maximum events per batch on an edge; larger batches cost less per event."
    )
    buffer: int = option(
        8, min=0, max=4096, help="Batches an edge buffers before its producer waits (the backpressure bound)."
    )
    teardown_timeout: Duration = option(
        Duration.parse("10s"), help="Maximum time each component's teardown may take after a stop or an error."
    )


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """One validated component table."""

    section: str
    name: str
    type_name: str
    cls: type[Component]
    options: Any
    inputs: tuple[str, ...]
    line: int | None


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """A validated pipeline: its settings and its components in file order."""

    path: Path
    settings: PipelineSettings
    components: Mapping[str, ComponentSpec]
    warnings: tuple[str, ...] = ()

    def consumers_of(self, name: str) -> list[ComponentSpec]:
        return [spec for spec in self.components.values() if name in spec.inputs]


class _LineIndex:
    """Line numbers of tables and keys in the raw TOML text.

    tomllib returns no positions, so this scans header and ``key =`` lines.
    It handles the forms pipeline files use (``[sources.NAME]`` headers and
    plain or quoted keys) and returns None for anything else.
    """

    _HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")

    def __init__(self, text: str) -> None:
        self.tables: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER.match(line)
            if header:
                table = ".".join(part.strip().strip("\"'") for part in header.group(1).split("."))
                self.tables.setdefault(table, number)
                continue
            key = self._KEY.match(line)
            if key:
                self.keys.setdefault((table, key.group(1).strip("\"'")), number)

    def find(self, table: str, key: str = "") -> int | None:
        if key:
            top_key = re.split(r"[.\[]", key, maxsplit=1)[0]
            if (table, top_key) in self.keys:
                return self.keys[(table, top_key)]
            # An inline table such as  audit = { type = "..." }  under [sources].
            section, _, name = table.partition(".")
            if (section, name) in self.keys:
                return self.keys[(section, name)]
        if table in self.tables:
            return self.tables[table]
        # A table that only appears as a prefix, such as [source] in [source.gen].
        nested = [line for name, line in self.tables.items() if name.startswith(table + ".")]
        return min(nested) if nested else None


@dataclasses.dataclass
class _Loader:
    path: Path
    lines: _LineIndex
    overrides: dict[tuple[str, ...], str] = dataclasses.field(default_factory=dict)

    def error(self, message: str, table: str = "", key: str = "") -> ConfigError:
        override = self._override_for(table, key)
        if override is not None:
            return ConfigError(message, path=f"{self.path} (--set {override})", table=table, key=key)
        line = self.lines.find(table, key) if table else None
        return ConfigError(message, path=self.path, line=line, table=table, key=key)

    def _override_for(self, table: str, key: str) -> str | None:
        if not key:
            return None
        key_path = tuple(table.split(".")) + (re.split(r"[.\[]", key, maxsplit=1)[0],)
        for path, text in self.overrides.items():
            if path[: len(key_path)] == key_path:
                return text
        return None


def load_pipeline(path: Path | str, overrides: Sequence[str] = ()) -> PipelineSpec:
    """Read, override and validate a pipeline file.

    ``overrides`` are ``--set`` arguments of the form ``TABLE.NAME.KEY=VALUE``,
    where VALUE is read as a TOML value and, if that fails, as a string.
    Raises ConfigError.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{kind}; pass the path of a pipeline file such as pipelines/trace.toml", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found; pass the path of a pipeline file such as pipelines/trace.toml", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path=path) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise ConfigError(f"invalid TOML: {exc}", path=path, line=line) from None
    except RecursionError:
        raise ConfigError("invalid TOML: arrays or tables are nested too deeply to read", path=path) from None
    loader = _Loader(path=path, lines=_LineIndex(text))
    for override in overrides:
        _apply_override(loader, raw, override)
    return _validate(loader, raw)


def _toml_error_line(message: str) -> int | None:
    match = re.search(r"at line (\d+)", message)
    return int(match.group(1)) if match else None


def _apply_override(loader: _Loader, raw: dict[str, Any], override: str) -> None:
    target, equals, value_text = override.partition("=")
    parts = tuple(part.strip() for part in target.split("."))
    if not equals or len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"invalid --set {override!r}: write TABLE.NAME.KEY=VALUE, "
            "such as sources.docker.launch.image=speaker-demo/nginx, or pipeline.KEY=VALUE",
            path=loader.path,
        )
    if parts[0] in SECTIONS and len(parts) < 3:
        raise ConfigError(
            f"invalid --set {override!r}: a component option needs three parts, {parts[0]}.NAME.KEY=VALUE",
            path=loader.path,
        )
    if parts[0] in SECTIONS and not isinstance(raw.get(parts[0], {}).get(parts[1]), dict):
        known = ", ".join(f"{parts[0]}.{name}" for name in raw.get(parts[0], {})) or "none"
        raise ConfigError(
            f"invalid --set {override!r}: the file has no [{parts[0]}.{parts[1]}] table, and --set only changes "
            f"components the file defines (defined {parts[0]}: {known})",
            path=loader.path,
        )
    try:
        parsed = tomllib.loads(f"value = {value_text}")
    except tomllib.TOMLDecodeError:
        value: Any = value_text
    else:
        if list(parsed) != ["value"]:
            raise ConfigError(
                f"invalid --set {override!r}: VALUE must be one TOML value, not several lines or tables",
                path=loader.path,
            )
        value = parsed["value"]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"invalid --set {override!r}: {where} is not a table", path=loader.path)
        node = child
    node[parts[-1]] = value
    loader.overrides[parts] = target


def _validate(loader: _Loader, raw: dict[str, Any]) -> PipelineSpec:
    for key in raw:
        if key not in (*SECTIONS, "pipeline"):
            close = difflib.get_close_matches(key, [*SECTIONS, "pipeline"], n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise loader.error(
                f"unknown top-level table {key!r}{hint} (expected pipeline, sources, stages and sinks)",
                table=key,
            )

    settings = _build_settings(loader, raw.get("pipeline", {}))
    specs: dict[str, ComponentSpec] = {}
    for section in SECTIONS:
        tables = raw.get(section, {})
        if not isinstance(tables, dict):
            raise loader.error(f"[{section}] must be a table of named components", table=section)
        for name, table in tables.items():
            spec = _build_component(loader, section, name, table, specs)
            specs[name] = spec

    if not any(spec.section == "sources" for spec in specs.values()):
        raise loader.error("the pipeline has no sources: add a [sources.NAME] table")
    if not any(spec.section == "sinks" for spec in specs.values()):
        raise loader.error("the pipeline has no sinks, so its events would go nowhere: add a [sinks.NAME] table")

    _check_inputs(loader, specs)
    _check_cycles(loader, specs)
    _check_event_types(loader, specs)
    warnings = _unused_outputs(specs)
    return PipelineSpec(path=loader.path, settings=settings, components=specs, warnings=tuple(warnings))


def _build_settings(loader: _Loader, table: Any) -> PipelineSettings:
    if not isinstance(table, dict):
        raise loader.error("[pipeline] must be a table", table="pipeline")
    try:
        return build_options(PipelineSettings, table)
    except OptionError as exc:
        raise loader.error(str(exc), table="pipeline", key=exc.key_path) from None


def _build_component(
    loader: _Loader, section: str, name: str, table: Any, seen: Mapping[str, ComponentSpec]
) -> ComponentSpec:
    where = f"{section}.{name}"
    if not isinstance(table, dict):
        raise loader.error(f"{where} must be a table with a 'type' key", table=where)
    if not _NAME_PATTERN.fullmatch(name):
        raise loader.error(
            f"invalid component name {name!r}: use letters, digits, '_' and '-'", table=where
        )
    if name in seen:
        raise loader.error(
            f"the name {name!r} is already used by [{seen[name].section}.{name}]; "
            "names must be unique across sources, stages and sinks, because inputs refer to them",
            table=where,
        )
    type_name = table.get("type")
    if type_name is None:
        raise loader.error("missing 'type': name a built-in type (see `python -m speaker components`) "
                           "or an import path 'package.module:Class'", table=where)
    if not isinstance(type_name, str):
        raise loader.error(f"'type' must be a string, got {type_name!r}", table=where, key="type")
    try:
        cls = resolve(section, type_name)
    except ComponentNotFound as exc:
        raise loader.error(str(exc), table=where, key="type") from None

    inputs = table.get("inputs")
    if section == "sources":
        if inputs is not None:
            raise loader.error("a source has no inputs: remove 'inputs', or make this a stage", table=where, key="inputs")
        inputs_tuple: tuple[str, ...] = ()
    else:
        if inputs is None or inputs == []:
            raise loader.error(
                f"a {cls.kind} needs inputs: add inputs = [\"NAME\", ...] naming the sources or stages it reads",
                table=where,
                key="inputs",
            )
        if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
            raise loader.error(f"'inputs' must be a list of component names, got {inputs!r}", table=where, key="inputs")
        duplicates = sorted({item for item in inputs if inputs.count(item) > 1})
        if duplicates:
            raise loader.error(f"'inputs' lists {', '.join(duplicates)} more than once", table=where, key="inputs")
        inputs_tuple = tuple(inputs)

    option_values = {key: value for key, value in table.items() if key not in ("type", "inputs")}
    try:
        options = build_options(cls.Options, option_values)
        check = getattr(cls, "check_options", None)
        if check is not None:
            check(options)
    except OptionError as exc:
        raise loader.error(str(exc), table=where, key=exc.key_path) from None
    return ComponentSpec(
        section=section,
        name=name,
        type_name=type_name,
        cls=cls,
        options=options,
        inputs=inputs_tuple,
        line=loader.lines.find(where),
    )


def _check_inputs(loader: _Loader, specs: Mapping[str, ComponentSpec]) -> None:
    producers = [name for name, spec in specs.items() if spec.section != "sinks"]
    for spec in specs.values():
        where = f"{spec.section}.{spec.name}"
        for name in spec.inputs:
            if name not in specs:
                close = difflib.get_close_matches(name, producers, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise loader.error(
                    f"input {name!r} does not exist{hint} (sources and stages: {', '.join(producers)})",
                    table=where,
                    key="inputs",
                )
            if specs[name].section == "sinks":
                raise loader.error(
                    f"input {name!r} is a sink, and sinks emit no events: read from a source or stage instead",
                    table=where,
                    key="inputs",
                )
            if name == spec.name:
                raise loader.error("a component cannot read its own output", table=where, key="inputs")


def _check_cycles(loader: _Loader, specs: Mapping[str, ComponentSpec]) -> None:
    # Depth-first search with an explicit stack, so that a long chain of
    # stages cannot exhaust Python's recursion limit.
    state: dict[str, str] = {}
    for root in specs:
        if root in state:
            continue
        trail = [root]
        stack = [iter(specs[root].inputs)]
        state[root] = "active"
        while stack:
            upstream = next(stack[-1], None)
            if upstream is None:
                state[trail.pop()] = "done"
                stack.pop()
                continue
            if state.get(upstream) == "done":
                continue
            if state.get(upstream) == "active":
                cycle = trail[trail.index(upstream) :] + [upstream]
                spec = specs[upstream]
                raise loader.error(
                    "the inputs form a cycle: " + " -> ".join(reversed(cycle)) + "; a pipeline must be a DAG",
                    table=f"{spec.section}.{spec.name}",
                    key="inputs",
                )
            state[upstream] = "active"
            trail.append(upstream)
            stack.append(iter(specs[upstream].inputs))


def _check_event_types(loader: _Loader, specs: Mapping[str, ComponentSpec]) -> None:
    for spec in specs.values():
        for name in spec.inputs:
            producer = specs[name]
            if not accepted_types(producer.cls.emits, spec.cls.accepts):
                emitted = ", ".join(cls.__name__ for cls in producer.cls.emits) or "nothing"
                accepted = ", ".join(cls.__name__ for cls in spec.cls.accepts) or "nothing"
                raise loader.error(
                    f"input {name!r} ({producer.type_name}) emits {emitted}, "
                    f"but {spec.type_name} accepts only {accepted}",
                    table=f"{spec.section}.{spec.name}",
                    key="inputs",
                )


def accepted_types(emitted: Sequence[type], accepted: Sequence[type]) -> list[type]:
    """Return the emitted types that a consumer accepting ``accepted`` receives."""
    return [cls for cls in emitted if any(issubclass(cls, target) or issubclass(target, cls) for target in accepted)]


def _unused_outputs(specs: Mapping[str, ComponentSpec]) -> list[str]:
    consumed = {name for spec in specs.values() for name in spec.inputs}
    return [
        f"[{spec.section}.{name}] feeds no stage or sink, so its events are discarded"
        for name, spec in specs.items()
        if spec.section != "sinks" and name not in consumed
    ]
