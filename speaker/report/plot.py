"""Draw a container's timeline as PNG and SVG with matplotlib (the optional ``plot`` extra)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from speaker.events import Phase
from speaker.report.timeline import ContainerTimeline

#: Figure size in inches at ``DPI``: 1200 x 700 pixels.
FIGURE_SIZE = (12.0, 7.0)
DPI = 100
PHASE_COLORS = {Phase.BOOTING: "#f4a261", Phase.RUNNING: "#2a9d8f", Phase.SHUTDOWN: "#e76f51"}


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_timeline(timeline: ContainerTimeline, prefix: Path) -> list[Path]:
    """Write ``PREFIX.png`` and ``PREFIX.svg`` and return their paths. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds, calls, distinct = timeline.series()
    if seconds:
        # A step plot draws each value up to the next point, so close the last second.
        seconds, calls, distinct = seconds + [seconds[-1] + 1], calls + calls[-1:], distinct + distinct[-1:]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=FIGURE_SIZE, dpi=DPI)
    top.plot(seconds, calls, color="#264653", linewidth=1.2, drawstyle="steps-post")
    top.set_ylabel("syscalls / s")
    bottom.plot(seconds, distinct, color="#6a4c93", linewidth=1.2, drawstyle="steps-post")
    bottom.set_ylabel("distinct syscalls / s")
    bottom.set_xlabel("seconds since the container started")

    origin = timeline.origin
    ordered = sorted(timeline.boundaries, key=lambda item: item.time)
    end = timeline.last_time - origin
    right = max(end, seconds[-1] if seconds else 0.0) + 0.2
    for index, boundary in enumerate(ordered):
        start = boundary.time - origin
        stop = ordered[index + 1].time - origin if index + 1 < len(ordered) else end
        color = PHASE_COLORS.get(boundary.phase, "#999999")
        for axis in (top, bottom):
            axis.axvspan(start, max(stop, start), color=color, alpha=0.15, linewidth=0)
            axis.axvline(start, color=color, linewidth=1.5)
        label = f"{boundary.phase} ({boundary.detector or '?'})"
        # A label near the right edge is written leftwards from its line, so that it stays inside the plot.
        leftwards = start > 0.75 * right
        top.annotate(
            label,
            xy=(start, 1.0),
            xycoords=("data", "axes fraction"),
            # Phases can begin milliseconds apart, so each label gets its own line.
            xytext=(-3 if leftwards else 3, -12 - 12 * index),
            textcoords="offset points",
            horizontalalignment="right" if leftwards else "left",
            fontsize=9,
            color=color,
            fontweight="bold",
        )
    for index, (when, action) in enumerate(sorted(timeline.markers)):
        bottom.axvline(when - origin, color="#555555", linewidth=0.8, linestyle=":")
        # Docker's kill, stop and die events come within a second, so their labels stand at different heights.
        bottom.annotate(
            action, xy=(when - origin, 0.02 + 0.2 * (index % 4)), xycoords=("data", "axes fraction"), fontsize=8, rotation=90
        )

    reasons = [
        f"{boundary.phase} at +{boundary.time - origin:.3f} s, {boundary.detector or '?'}: {boundary.reason}" for boundary in ordered
    ]
    caption = "\n".join(textwrap.shorten(reason, 150) for reason in reasons)
    title = f"{timeline.label}" + (f" ({timeline.image})" if timeline.image else "")
    if timeline.problems:
        title += " - INCOMPLETE"
    figure.suptitle(title)
    figure.text(0.01, 0.01, caption, fontsize=8, va="bottom")
    figure.tight_layout(rect=(0, 0.02 + 0.025 * len(reasons), 1, 0.97))
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
        axis.set_xlim(left=0.0, right=right)
        axis.set_ylim(bottom=0)

    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + ".png"), prefix.with_name(prefix.name + ".svg")]
    for path in paths:
        figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return paths
