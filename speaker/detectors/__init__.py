"""Readiness detectors and the pipeline-file form that selects them.

A detector is written in a pipeline file as one of:

* a type name with default options: ``detector = "window"``;
* a table with ``type`` and the detector's options:
  ``detector = { type = "listen", port = 6379 }``;
* a combinator table with one key, ``any`` or ``all``, whose value is a
  non-empty list of detectors in any of these forms:
  ``detector = { any = [ { type = "listen", port = 6379 }, { type = "delay", after = "30s" } ] }``.

``any`` fires with the first child that fires. ``all`` fires once every child
has fired, at the latest child's time.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from speaker.detectors.base import Detector, DetectorSpec, Readiness
from speaker.detectors.combinators import AllOf, AnyOf
from speaker.detectors.delay import Delay
from speaker.detectors.health import Health
from speaker.detectors.listen import Listen
from speaker.detectors.log import Log
from speaker.detectors.quiescence import Quiescence
from speaker.detectors.window import Window
from speaker.options import OptionError, build_options

__all__ = ["Detector", "DetectorSpec", "Readiness", "DETECTORS", "COMBINATORS", "parse_detector"]

#: Detector classes by the ``type`` written in pipeline files.
DETECTORS: dict[str, type[Detector]] = {
    cls.type_name: cls for cls in (Window, Health, Listen, Log, Quiescence, Delay)
}
#: Combinator classes by their key.
COMBINATORS: dict[str, type[Detector]] = {"any": AnyOf, "all": AllOf}


def parse_detector(value: Any, key_path: str = "") -> DetectorSpec:
    """Validate a detector written in any of the forms above and return its spec.

    Raises OptionError whose ``key_path`` (relative to the option holding the
    detector) names the offending entry, such as ``.any[1].after``.
    """
    if isinstance(value, str):
        return _leaf(value, {}, key_path, key_path)
    if not isinstance(value, Mapping):
        raise OptionError(
            'a detector is a type name such as "window", a table such as { type = "listen", port = 6379 }, '
            f"or {{ any = [...] }} / {{ all = [...] }}; got {value!r}",
            key_path,
        )
    combinator_keys = [key for key in value if key in COMBINATORS]
    if combinator_keys:
        return _combinator(value, combinator_keys, key_path)
    type_name = value.get("type")
    if type_name is None:
        raise OptionError(
            "missing 'type' in the detector table: name one of "
            + ", ".join(sorted(DETECTORS))
            + ", or write { any = [...] } or { all = [...] }",
            key_path,
        )
    if not isinstance(type_name, str):
        raise OptionError(f"'type' must be a string, got {type_name!r}", key_path + ".type")
    options = {key: item for key, item in value.items() if key != "type"}
    return _leaf(type_name, options, key_path, key_path + ".type")


def _leaf(type_name: str, options: Mapping[str, Any], key_path: str, type_path: str) -> DetectorSpec:
    cls = DETECTORS.get(type_name)
    if cls is None:
        known = sorted([*DETECTORS, *COMBINATORS])
        close = difflib.get_close_matches(type_name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if type_name in COMBINATORS:
            raise OptionError(
                f"{type_name!r} is a combinator: write {{ {type_name} = [ detector, ... ] }}", type_path
            )
        raise OptionError(
            f"unknown detector type {type_name!r}{hint} (known: {', '.join(sorted(DETECTORS))}, and any/all)",
            type_path,
        )
    try:
        built = build_options(cls.Options, options)
        cls.check_options(built)
    except OptionError as exc:
        prefix = f"detector {type_name!r}: "
        raise OptionError(prefix + str(exc), f"{key_path}.{exc.key_path}" if exc.key_path else key_path) from None
    return DetectorSpec(cls, built)


def _combinator(value: Mapping[str, Any], keys: list[str], key_path: str) -> DetectorSpec:
    if len(value) != 1:
        others = ", ".join(repr(key) for key in value if key != keys[0])
        raise OptionError(
            f"a combinator table has exactly one key, 'any' or 'all', but this one also has {others}; "
            "put each detector inside the list",
            key_path,
        )
    key = keys[0]
    children = value[key]
    if not isinstance(children, list) or not children:
        raise OptionError(f"'{key}' must be a non-empty list of detectors, got {children!r}", f"{key_path}.{key}")
    specs = tuple(parse_detector(child, f"{key_path}.{key}[{index}]") for index, child in enumerate(children))
    return DetectorSpec(COMBINATORS[key], None, specs)
