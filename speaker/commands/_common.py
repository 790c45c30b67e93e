"""Helpers shared by the subcommands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from speaker.config import ConfigError, PipelineSpec, load_pipeline


def load_or_report(path: str, overrides: Sequence[str] = ()) -> PipelineSpec | None:
    """Load a pipeline file, printing the error and returning None when it is invalid."""
    try:
        spec = load_pipeline(path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    for warning in spec.warnings:
        print(f"warning: {spec.path}: {warning}", file=sys.stderr)
    return spec
