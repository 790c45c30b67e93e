"""Find component classes by the ``type`` written in a pipeline file.

A type is resolved in this order:

1. ``package.module:Class``, an import path to any class of the right kind;
2. a built-in: the type name is the module name, so ``type = "audit_log"``
   in ``[sources.NAME]`` is the class in ``speaker/sources/audit_log.py``;
3. an entry point named after the type in the ``speaker.components`` group,
   which is how an installed package adds components.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import pkgutil
from types import ModuleType

from speaker.component import Component, Sink, Source, Stage

ENTRY_POINT_GROUP = "speaker.components"

KINDS: dict[str, type[Component]] = {"sources": Source, "stages": Stage, "sinks": Sink}


class ComponentNotFound(LookupError):
    """The type names no importable component of the requested kind."""


def resolve(section: str, type_name: str) -> type[Component]:
    """Return the class for ``type_name`` in a ``sources``, ``stages`` or ``sinks`` table."""
    base = KINDS[section]
    if ":" in type_name:
        return _check_kind(_load_import_path(type_name), base, type_name)
    builtin = _load_builtin(section, type_name)
    if builtin is not None:
        return builtin
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == type_name:
            try:
                loaded = entry_point.load()
            except (Exception, SystemExit) as exc:
                raise ComponentNotFound(
                    f"entry point {type_name!r} ({entry_point.value}) failed to load: {exc}"
                ) from exc
            return _check_kind(loaded, base, type_name)
    names = builtin_names(section)
    close = difflib.get_close_matches(type_name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    raise ComponentNotFound(
        f"unknown {base.kind} type {type_name!r}{hint} Built-in {section}: {', '.join(names)}. "
        f"For your own component, write an import path such as 'mypackage.module:Class', "
        f"or register it in the {ENTRY_POINT_GROUP!r} entry-point group"
    )


def builtin_names(section: str) -> list[str]:
    """Return the names of the built-in components of one kind."""
    package = importlib.import_module(f"speaker.{section}")
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))


def all_components() -> tuple[list[tuple[str, str, type[Component]]], list[str]]:
    """Return ``(section, type_name, class)`` for every built-in and entry-point component, and load errors.

    An installed entry point that fails to load is reported in the second
    list instead of hiding every other component.
    """
    found = []
    errors = []
    for section in KINDS:
        for name in builtin_names(section):
            found.append((section, name, resolve(section, name)))
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except (Exception, SystemExit) as exc:
            errors.append(f"entry point {entry_point.name!r} ({entry_point.value}) failed to load: {exc}")
            continue
        for section, base in KINDS.items():
            if inspect.isclass(loaded) and issubclass(loaded, base):
                found.append((section, entry_point.name, loaded))
    return found, errors


def _load_builtin(section: str, type_name: str) -> type[Component] | None:
    if not type_name.isidentifier() or type_name not in builtin_names(section):
        return None
    module = importlib.import_module(f"speaker.{section}.{type_name}")
    component = _component_of_module(module, KINDS[section], type_name)
    check_component_class(component)
    return component


def _component_of_module(module: ModuleType, base: type[Component], type_name: str) -> type[Component]:
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, base)
        and value.__module__ == module.__name__
        and value.type_name == type_name
    ]
    if len(classes) != 1:
        raise ComponentNotFound(
            f"module {module.__name__} must define exactly one {base.__name__} subclass "
            f"with type_name = {type_name!r}, found {len(classes)}"
        )
    return classes[0]


def _load_import_path(path: str) -> object:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ComponentNotFound(f"invalid import path {path!r}: write it as 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ComponentNotFound(
            f"cannot import module {module_name!r} of {path!r}: {exc}. "
            "Install the package, or run from the directory that contains it"
        ) from exc
    except (Exception, SystemExit) as exc:
        raise ComponentNotFound(
            f"importing module {module_name!r} of {path!r} raised {type(exc).__name__}: {exc}; fix the module"
        ) from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ComponentNotFound(f"module {module_name!r} has no attribute {attribute!r}") from None
    return target


def _check_kind(loaded: object, base: type[Component], type_name: str) -> type[Component]:
    if not (inspect.isclass(loaded) and issubclass(loaded, base)):
        raise ComponentNotFound(
            f"{type_name!r} is {loaded!r}, not a subclass of speaker.component.{base.__name__}"
        )
    check_component_class(loaded)
    return loaded


def check_component_class(cls: type[Component]) -> None:
    """Raise ComponentNotFound unless the class declares what the validator and engine read."""
    from speaker.events import Event

    where = f"{cls.__module__}.{cls.__qualname__}"
    if not (inspect.isclass(cls.Options) and dataclasses.is_dataclass(cls.Options)):
        raise ComponentNotFound(f"{where}.Options must be a dataclass whose fields are made with speaker.options.option")
    for attribute in ("accepts", "emits"):
        declared = getattr(cls, attribute)
        if not isinstance(declared, tuple) or not all(
            inspect.isclass(item) and issubclass(item, Event) for item in declared
        ):
            raise ComponentNotFound(
                f"{where}.{attribute} must be a tuple of event classes from speaker.events, got {declared!r}"
            )
