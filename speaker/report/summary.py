"""The terminal summary of a trace: phase boundaries and per-phase totals for each container."""

from __future__ import annotations

from speaker.report.timeline import ContainerTimeline


def render_summary(timeline: ContainerTimeline) -> str:
    """Return the summary of one container's timeline as text lines."""
    origin = timeline.origin
    title = f"Container {timeline.label}" + (f" ({timeline.image})" if timeline.image else "") + f" {timeline.container_id[:12]}"
    lines = [title, "  phase boundaries:"]
    for boundary in sorted(timeline.boundaries, key=lambda item: item.time):
        lines.append(
            f"    {boundary.phase:<9} at {boundary.time - origin:+9.3f} s  ({boundary.detector or '?'}: {boundary.reason})"
        )
    if not timeline.boundaries:
        lines.append("    none: the trace has no PhaseChange events (was the phase_machine stage in the pipeline?)")
    lines.append(f"  {'phase':<10}{'start s':>9}{'length s':>10}{'syscalls':>12}{'per s':>10}{'distinct':>10}{'peak distinct/s':>17}")
    for stats in timeline.phase_stats():
        lines.append(
            f"  {stats.phase:<10}{stats.start:>+9.3f}{stats.duration:>10.3f}{stats.calls:>12,}"
            f"{stats.calls_per_second:>10,.0f}{stats.distinct:>10}{stats.peak_distinct_per_second:>17}"
        )
    seconds, calls, _ = timeline.series()
    if seconds:
        busiest = max(range(len(calls)), key=calls.__getitem__)
        lines.append(
            f"  {sum(calls):,} syscalls over {len(seconds)} s; busiest second {seconds[busiest]:+.0f} s with {calls[busiest]:,}"
        )
    for marker_time, action in timeline.markers:
        lines.append(f"  docker {action} at {marker_time - origin:+.3f} s")
    if timeline.problems:
        lines.append("  incomplete:")
        lines.extend(f"    - {problem}" for problem in timeline.problems)
    return "\n".join(lines) + "\n"
