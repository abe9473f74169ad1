"""Line charts as SVG, rendered on the server: one measurement of one meter over time.

A pure function of its points, so the dashboard needs no charting library, no CDN and no build step,
and the tests read the result with ``xml.etree``. The time axis picks a tick step from seconds to weeks
so that a handful of labelled ticks cover the readings' span (labels in UTC); the value axis uses the
usual 1-2-5 steps, over the readings or over a range the caller gives (the bottle's, from 0 to full, so
that sensor noise of 0.03 mol does not fill the height as a steep fall). Readings further apart than
``max_gap`` are not joined: the line breaks where the meter was silent. Every text that reaches the SVG
(titles, meter ids, which come from devices) is escaped here, and characters XML cannot hold at all are
dropped. Colours are presentation attributes,
not ``style`` attributes or elements, so the SVG renders the same inline under the dashboard's strict
Content-Security-Policy and opened on its own.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

#: A circle marks each reading while readings are at least this far apart on average; closer, the line
#: alone reads better.
MARKER_SPACING_PX = 6
EMPTY_MESSAGE = "No readings in this window"
_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

#: Candidate time-axis steps in seconds, with the label format each implies.
_TIME_STEPS: tuple[tuple[int, str], ...] = (
    (1, "%H:%M:%S"),
    (2, "%H:%M:%S"),
    (5, "%H:%M:%S"),
    (10, "%H:%M:%S"),
    (15, "%H:%M:%S"),
    (30, "%H:%M:%S"),
    (60, "%H:%M"),
    (120, "%H:%M"),
    (300, "%H:%M"),
    (600, "%H:%M"),
    (900, "%H:%M"),
    (1800, "%H:%M"),
    (3600, "%H:%M"),
    (2 * 3600, "%H:%M"),
    (3 * 3600, "%H:%M"),
    (6 * 3600, "%d %b %H:%M"),
    (12 * 3600, "%d %b %H:%M"),
    (86400, "%d %b"),
    (2 * 86400, "%d %b"),
    (7 * 86400, "%d %b"),
    (14 * 86400, "%d %b"),
)
_WANTED_TIME_TICKS = 5
_WANTED_VALUE_TICKS = 5


@dataclass(frozen=True, slots=True)
class ChartLayout:
    """The drawing area: the whole SVG and the margins around the plot."""

    width: int = 440
    height: int = 190
    left: int = 64
    right: int = 32
    top: int = 30
    bottom: int = 38

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom

    @property
    def max_markers(self) -> int:
        return self.plot_width // MARKER_SPACING_PX


def escape(text: str) -> str:
    """Text for SVG/XML content or a quoted attribute: markup characters escaped, impossible characters dropped."""
    return html.escape(_XML_INVALID.sub("", text), quote=True)


def render_line_chart(
    points: Sequence[tuple[datetime, float]],
    *,
    title: str,
    unit: str,
    description: str = "",
    value_range: tuple[float, float] | None = None,
    max_gap: timedelta | None = None,
    projection: Sequence[tuple[datetime, float]] = (),
    events: Sequence[tuple[datetime, str]] = (),
    layout: ChartLayout = ChartLayout(),  # frozen, so one shared default is safe
) -> str:
    """An SVG document: ``title`` above, time ticks below, value ticks in ``unit`` on the left, the points as
    polylines (one vertex per point, in time order) with a circle on each (while they are not too dense).

    ``value_range``: the value axis covers at least (low, high), and still every point (a bottle over its
    nominal pressure is drawn above the top of its range, not off the chart); None: the points alone.
    ``max_gap``: consecutive points further apart start a new polyline (a gap), and a point alone between
    two gaps gets its circle however dense the rest. Without points, the axes frame a message instead.
    ``description`` becomes the SVG's accessible title. ``projection``: a forecast, drawn dashed (class
    ``forecast``) from its first point to its last, the axes widened to hold it; ``events``: moments marked
    by a vertical line each (class ``event``, the text as its tooltip), those inside the readings' span.
    """
    ordered = sorted(((_utc(t), float(v)) for t, v in points if math.isfinite(v)), key=lambda p: p[0])
    label = f"{title} ({unit})" if unit else title
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {layout.width} {layout.height}"'
        f' width="{layout.width}" height="{layout.height}" role="img" data-points="{len(ordered)}"'
        f' font-family="system-ui, sans-serif" font-size="11">',
        f"<title>{escape(description or label)}</title>",
        f'<rect class="chart-background" x="0" y="0" width="{layout.width}" height="{layout.height}" fill="#ffffff"/>',
        f'<text class="chart-title" x="{layout.left}" y="18" font-size="13" font-weight="600"'
        f' fill="#1f2933">{escape(label)}</text>',
    ]
    if not ordered:
        parts.extend(_frame(layout))
        parts.append(
            f'<text class="chart-empty" x="{layout.left + layout.plot_width / 2:.1f}"'
            f' y="{layout.top + layout.plot_height / 2:.1f}" text-anchor="middle" font-size="13"'
            f' fill="#7b8794">{escape(EMPTY_MESSAGE)}</text>'
        )
        parts.append("</svg>")
        return "\n".join(parts)

    projected = sorted(((_utc(t), float(v)) for t, v in projection if math.isfinite(v)), key=lambda p: p[0])
    start, end = ordered[0][0], max(ordered[-1][0], projected[-1][0] if projected else ordered[-1][0])
    if end - start < timedelta(seconds=2):  # one reading, or several at once: give the axis some width
        start, end = start - timedelta(seconds=30), end + timedelta(seconds=30)
    lowest = min(v for _, v in [*ordered, *projected])
    highest = max(v for _, v in [*ordered, *projected])
    if value_range is not None:
        lowest, highest = min(lowest, value_range[0]), max(highest, value_range[1])
    low, high, value_step = _value_axis(lowest, highest)
    span_s = (end - start).total_seconds()

    def x(moment: datetime) -> float:
        return layout.left + (moment - start).total_seconds() / span_s * layout.plot_width

    def y(value: float) -> float:
        return layout.top + (high - value) / (high - low) * layout.plot_height

    decimals = max(0, -math.floor(math.log10(value_step))) if value_step < 1 else 0
    bottom = layout.top + layout.plot_height
    for index in range(round((high - low) / value_step) + 1):
        value = low + index * value_step
        at = y(value)
        parts.append(
            f'<line class="grid" x1="{layout.left}" y1="{at:.1f}" x2="{layout.left + layout.plot_width}"'
            f' y2="{at:.1f}" stroke="#e4e7eb" stroke-width="1"/>'
        )
        parts.append(
            f'<text class="tick value-tick" x="{layout.left - 6}" y="{at + 4:.1f}" text-anchor="end"'
            f' fill="#52606d">{value:.{decimals}f}</text>'
        )
    step_s, fmt = _time_step(span_s)
    for tick in _time_ticks(start, end, step_s):
        at = x(tick)
        parts.append(
            f'<line class="tick-mark" x1="{at:.1f}" y1="{bottom}" x2="{at:.1f}" y2="{bottom + 5}"'
            f' stroke="#9aa5b1" stroke-width="1"/>'
        )
        parts.append(
            f'<text class="tick time-tick" x="{at:.1f}" y="{bottom + 17}" text-anchor="middle"'
            f' fill="#52606d">{tick.strftime(fmt)}</text>'
        )
    parts.extend(_frame(layout))
    parts.append(
        f'<text class="axis-label" x="{layout.left + layout.plot_width}" y="{layout.height - 4}" text-anchor="end"'
        f' fill="#7b8794">time (UTC)</text>'
    )
    if unit:
        parts.append(
            f'<text class="axis-label unit" x="{layout.left - 6}" y="{layout.top - 8}" text-anchor="end"'
            f' fill="#7b8794">{escape(unit)}</text>'
        )
    segments = split_at_gaps(ordered, max_gap)
    parts.append(f'<g class="series-group" data-segments="{len(segments)}">')
    for segment in segments:
        vertices = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in segment)
        parts.append(
            f'<polyline class="series" points="{vertices}" fill="none" stroke="#2563eb" stroke-width="2"'
            f' stroke-linejoin="round" stroke-linecap="round"/>'
        )
    parts.append("</g>")
    if len(projected) >= 2:
        vertices = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in projected)
        parts.append(
            f'<polyline class="forecast" points="{vertices}" fill="none" stroke="#d97706" stroke-width="2"'
            f' stroke-dasharray="6 4"/>'
        )
    shown_events = [(_utc(t), text) for t, text in events if start <= _utc(t) <= end]
    if shown_events:
        parts.append(f'<g class="events" data-events="{len(shown_events)}">')
        parts.extend(
            f'<line class="event" x1="{x(t):.1f}" y1="{layout.top}" x2="{x(t):.1f}" y2="{bottom}" stroke="#16a34a"'
            f' stroke-width="1.5"><title>{escape(text)}</title></line>'
            for t, text in shown_events
        )
        parts.append("</g>")
    lone = [segment[0] for segment in segments if len(segment) == 1]
    if len(ordered) > layout.max_markers and lone:  # a polyline of one vertex draws nothing: mark it
        parts.append('<g class="points lone" fill="#2563eb">')
        parts.extend(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5"/>' for t, v in lone)
        parts.append("</g>")
    if len(ordered) <= layout.max_markers:
        parts.append('<g class="points" fill="#2563eb">')
        parts.extend(
            f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5"><title>{t.strftime("%Y-%m-%d %H:%M:%S")} UTC: '
            f"{v:.{decimals + 2}f} {escape(unit)}</title></circle>"
            for t, v in ordered
        )
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def split_at_gaps(
    ordered: Sequence[tuple[datetime, float]], max_gap: timedelta | None
) -> list[list[tuple[datetime, float]]]:
    """Time-ordered points cut into runs whose consecutive points are at most ``max_gap`` apart."""
    segments: list[list[tuple[datetime, float]]] = []
    for point in ordered:
        if segments and (max_gap is None or point[0] - segments[-1][-1][0] <= max_gap):
            segments[-1].append(point)
        else:
            segments.append([point])
    return segments


def _frame(layout: ChartLayout) -> list[str]:
    bottom = layout.top + layout.plot_height
    return [
        f'<line class="axis x-axis" x1="{layout.left}" y1="{bottom}" x2="{layout.left + layout.plot_width}"'
        f' y2="{bottom}" stroke="#9aa5b1" stroke-width="1"/>',
        f'<line class="axis y-axis" x1="{layout.left}" y1="{layout.top}" x2="{layout.left}" y2="{bottom}"'
        f' stroke="#9aa5b1" stroke-width="1"/>',
    ]


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _time_step(span_s: float) -> tuple[int, str]:
    """The smallest step giving at most about ``_WANTED_TIME_TICKS`` ticks over the span."""
    for step, fmt in _TIME_STEPS:
        if span_s / step <= _WANTED_TIME_TICKS:
            return step, fmt
    weeks = math.ceil(span_s / _WANTED_TIME_TICKS / (7 * 86400))
    return weeks * 7 * 86400, "%d %b %Y"


def _time_ticks(start: datetime, end: datetime, step_s: int) -> list[datetime]:
    """Tick times inside [start, end], on whole multiples of the step since the epoch (midnight UTC for days)."""
    first = math.ceil(start.timestamp() / step_s) * step_s
    last = end.timestamp()
    return [datetime.fromtimestamp(t, UTC) for t in range(first, math.floor(last) + 1, step_s)]


def _value_axis(low: float, high: float) -> tuple[float, float, float]:
    """A 1-2-5 step and the bounds, multiples of it, that enclose [low, high]."""
    if high - low < 1e-9 * max(1.0, abs(high)):  # a flat line: centre it in a band around the value
        pad = abs(high) * 0.05 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / _WANTED_VALUE_TICKS
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return math.floor(low / step) * step, math.ceil(high / step) * step, step
