"""The text and JSON that ``speaker profile show`` prints."""

from __future__ import annotations

import datetime
from typing import Any

from speaker.compile import CompileSettings, EmptyPhase, Layout, compile_plan, plan_layout
from speaker.events import PHASES
from speaker.profiles.merge import PhaseSummary, summarize
from speaker.profiles.model import Profile


def show_data(
    profile: Profile,
    settings: CompileSettings,
    *,
    baseline: frozenset[str] | None = None,
    baseline_label: str = "",
    arch: str | None = None,
    with_sizes: bool = True,
) -> dict[str, Any]:
    """Return everything ``profile show`` reports, as JSON-ready data."""
    rows = summarize(profile, baseline, arch)
    union = profile.union(arch)
    data: dict[str, Any] = {
        # None: a profile read from lists or a Docker JSON records no trace to judge by.
        "complete": profile.complete if profile.traces else None,
        "problems": profile.problems,
        "arches": list(profile.arches),
        "compared_arch": arch or "all",
        "images": list(profile.images),
        "traces": [
            {
                "container": trace.container_name or trace.container_id[:12],
                "image": trace.image,
                "started": trace.started,
                "kernel": trace.kernel,
                "docker_version": trace.docker_version,
                "libseccomp_version": trace.libseccomp_version,
                "detector": trace.detector,
                "lost": trace.lost,
                "transitions": [
                    {
                        "phase": item.phase.value,
                        "after_seconds": round(item.time - trace.started, 3) if trace.started else None,
                        "detector": item.detector,
                        "reason": item.reason,
                    }
                    for item in trace.transitions
                ],
            }
            for trace in profile.traces
        ],
        "phases": [_row_data(row) for row in rows],
        "union": len(union),
        "baseline": {"label": baseline_label, "syscalls": len(baseline)} if baseline is not None else None,
        "default_action": str(settings.default_action),
        "invariants": {},
        "instructions": {},
        "notes": list(profile.notes),
    }
    lists = profile.lists()
    for layout, phase in [(Layout.PHASE, phase) for phase in PHASES] + [(Layout.UNION, None), (Layout.NOTIFY, None)]:
        key = phase.value if phase else layout.value
        try:
            plan = plan_layout(lists, layout, settings, phase)
        except EmptyPhase:
            continue
        data["invariants"].update({name: str(action) for name, action in plan.invariants.items()})
        if with_sizes:
            data["instructions"][key] = compile_plan(plan).instructions
    data["invariants"] = dict(sorted(data["invariants"].items()))
    return data


def _row_data(row: PhaseSummary) -> dict[str, Any]:
    return {
        "phase": row.phase.value,
        "syscalls": len(row.names),
        "added": sorted(row.added),
        "removed": sorted(row.removed),
        "calls": row.calls,
        "reduction_vs_union": round(row.reduction_vs_union, 4),
        "reduction_vs_baseline": None if row.reduction_vs_baseline is None else round(row.reduction_vs_baseline, 4),
        "beyond_baseline": sorted(row.beyond_baseline),
    }


def render_show(data: dict[str, Any], title: str) -> str:
    """Format ``show_data`` output as the table people read."""
    lines = [f"Profile {title}"]
    lines += _provenance_lines(data)
    lines.append("")
    lines += _table_lines(data)
    lines.append("")
    lines += _change_lines(data)
    lines.append("")
    lines += _filter_lines(data)
    return "\n".join(lines) + "\n"


def _provenance_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    if data["complete"] is None:
        lines.append("Complete: unknown (the profile records no trace)")
    elif data["complete"]:
        lines.append("Complete: yes")
    else:
        lines.append("Complete: NO")
        lines.extend(f"  - {problem}" for problem in data["problems"])
    if data["images"]:
        lines.append(f"Images: {', '.join(data['images'])}")
    lines.append(f"Architectures: {', '.join(data['arches']) or 'none'} (compared: {data['compared_arch']})")
    for trace in data["traces"]:
        versions = ", ".join(
            f"{label} {value}"
            for label, value in (("kernel", trace["kernel"]), ("Docker", trace["docker_version"]), ("libseccomp", trace["libseccomp_version"]))
            if value
        )
        summary = f"Trace {trace['container'] or '?'}: {trace['image'] or 'unknown image'}, {_when(trace['started'])}"
        lines.append(summary + (f" ({versions})" if versions else ""))
        for item in trace["transitions"]:
            offset = f"+{item['after_seconds']:.3f}s" if item["after_seconds"] is not None else ""
            lines.append(f"  {item['phase']:<9}{offset:>11}  {item['detector'] or '-'}: {item['reason']}")
        if trace["lost"]:
            lines.append(f"  lost records: {', '.join(f'{key} {value}' for key, value in sorted(trace['lost'].items()))}")
    return lines


def _table_lines(data: dict[str, Any]) -> list[str]:
    has_baseline = data["baseline"] is not None
    header = f"{'phase':<10}{'syscalls':>9}{'added':>7}{'removed':>9}{'calls':>13}{'vs union':>10}"
    if has_baseline:
        header += f"{'vs baseline':>13}"
    lines = [header]
    for row in data["phases"]:
        line = (
            f"{row['phase']:<10}{row['syscalls']:>9}{len(row['added']):>7}{len(row['removed']):>9}"
            f"{row['calls']:>13,}{_percent(row['reduction_vs_union']):>10}"
        )
        if has_baseline:
            line += f"{_percent(row['reduction_vs_baseline']):>13}"
        lines.append(line)
    lines.append(f"{'union':<10}{data['union']:>9}")
    if has_baseline:
        lines.append(f"{'baseline':<10}{data['baseline']['syscalls']:>9}  ({data['baseline']['label']})")
    if has_baseline:
        lines.append("'vs union' and 'vs baseline' are how many fewer syscalls the phase allows (1 - phase/other).")
    else:
        lines.append("'vs union' is how many fewer syscalls the phase allows than the union (1 - phase/union).")
    return lines


def _change_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for row in data["phases"][1:]:
        lines.append(f"{row['phase']} adds: {', '.join(row['added']) or 'nothing'}")
        lines.append(f"{row['phase']} removes: {', '.join(row['removed']) or 'nothing'}")
    if data["baseline"] is not None:
        for row in data["phases"]:
            if row["beyond_baseline"]:
                lines.append(f"{row['phase']} allows what the baseline denies: {', '.join(row['beyond_baseline'])}")
    return lines


def _filter_lines(data: dict[str, Any]) -> list[str]:
    invariants = ", ".join(f"{name} {action}" for name, action in data["invariants"].items())
    lines = [f"Compiled filters: default action {data['default_action']}; safety invariants: {invariants or 'none'}"]
    if data["instructions"]:
        lines.append("BPF instructions: " + ", ".join(f"{key} {count}" for key, count in data["instructions"].items()))
    lines.extend(f"Note: {note}" for note in data["notes"])
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _when(seconds: float | None) -> str:
    if not seconds:
        return "time unknown"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
