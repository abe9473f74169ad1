"""The SVG line chart (chart.py): well-formed, one vertex per reading, readable axes, escaped text."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from smartgas_consumer.chart import EMPTY_MESSAGE, ChartLayout, escape, render_line_chart

SVG = "{http://www.w3.org/2000/svg}"
START = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def series(count: int, step: timedelta, first: float = 400.0, slope: float = -0.5) -> list[tuple[datetime, float]]:
    return [(START + i * step, first + slope * i) for i in range(count)]


def texts(root: ET.Element, css_class: str) -> list[str]:
    return [
        "".join(node.itertext()) for node in root.iter(f"{SVG}text") if css_class in (node.get("class") or "").split()
    ]


def vertices(root: ET.Element) -> list[tuple[float, float]]:
    polyline = root.find(f".//{SVG}polyline")
    assert polyline is not None
    return [(float(x), float(y)) for x, y in (pair.split(",") for pair in polyline.get("points", "").split())]


def test_polyline_has_one_vertex_per_reading_in_time_order() -> None:
    points = series(30, timedelta(seconds=10))
    root = parse(render_line_chart(list(reversed(points)), title="Gas left", unit="mol"))
    drawn = vertices(root)
    assert len(drawn) == 30 == int(root.get("data-points", "-1"))
    assert [x for x, _ in drawn] == sorted(x for x, _ in drawn)
    # The values fall, so the line goes down the page (SVG y grows downwards).
    assert drawn[0][1] < drawn[-1][1]
    assert len(root.findall(f".//{SVG}circle")) == 30


def test_the_line_stays_inside_the_plot() -> None:
    root = parse(render_line_chart(series(50, timedelta(minutes=1), first=0.0, slope=3.7), title="P", unit="bar"))
    x_axis = next(n for n in root.iter(f"{SVG}line") if "x-axis" in (n.get("class") or ""))
    y_axis = next(n for n in root.iter(f"{SVG}line") if "y-axis" in (n.get("class") or ""))
    left, right = float(x_axis.get("x1", "0")), float(x_axis.get("x2", "0"))
    top, bottom = float(y_axis.get("y1", "0")), float(y_axis.get("y2", "0"))
    for x, y in vertices(root):
        assert left <= x <= right and top <= y <= bottom


def test_title_unit_and_value_ticks() -> None:
    root = parse(
        render_line_chart(series(10, timedelta(seconds=5), first=150.0, slope=2.0), title="Pressure", unit="bar")
    )
    assert texts(root, "chart-title") == ["Pressure (bar)"]
    assert texts(root, "unit") == ["bar"]
    assert "time (UTC)" in texts(root, "axis-label")
    ticks = [float(t) for t in texts(root, "value-tick")]
    assert 3 <= len(ticks) <= 8
    assert ticks == sorted(ticks)
    assert ticks[0] <= 150.0 and ticks[-1] >= 168.0  # the ticks enclose every value
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and steps.pop() in {1.0, 2.0, 5.0, 10.0}


@pytest.mark.parametrize(
    ("span", "label"),
    [
        (timedelta(seconds=8), r"^\d\d:\d\d:\d\d$"),
        (timedelta(minutes=3), r"^\d\d:\d\d(:\d\d)?$"),
        (timedelta(hours=5), r"^\d\d:\d\d$"),
        (timedelta(days=1, hours=6), r"^\d\d [A-Z][a-z]{2} \d\d:\d\d$"),
        (timedelta(days=12), r"^\d\d [A-Z][a-z]{2}$"),
        (timedelta(days=400), r"^\d\d [A-Z][a-z]{2} \d{4}$"),
    ],
    ids=["seconds", "minutes", "hours", "a-day", "days", "a-year"],
)
def test_time_axis_fits_spans_from_seconds_to_days(span: timedelta, label: str) -> None:
    points = series(25, span / 24)
    root = parse(render_line_chart(points, title="Gas left", unit="mol"))
    ticks = texts(root, "time-tick")
    assert 2 <= len(ticks) <= 8, ticks
    assert all(re.match(label, tick) for tick in ticks), ticks
    assert len(set(ticks)) == len(ticks)  # no two ticks say the same thing
    positions = [float(n.get("x", "0")) for n in root.iter(f"{SVG}text") if "time-tick" in (n.get("class") or "")]
    assert positions == sorted(positions)


def test_one_reading_and_a_flat_line_still_draw() -> None:
    one = parse(render_line_chart([(START, 42.0)], title="Fill", unit="%"))
    assert len(vertices(one)) == 1
    assert texts(one, "time-tick")
    flat = parse(render_line_chart(series(5, timedelta(seconds=10), first=7.0, slope=0.0), title="T", unit="°C"))
    ticks = [float(t) for t in texts(flat, "value-tick")]
    assert ticks[0] < 7.0 < ticks[-1]
    assert len({y for _, y in vertices(flat)}) == 1


def test_empty_state() -> None:
    root = parse(render_line_chart([], title="Gas left", unit="mol"))
    assert root.get("data-points") == "0"
    assert texts(root, "chart-empty") == [EMPTY_MESSAGE]
    assert root.find(f".//{SVG}polyline") is None
    assert not texts(root, "time-tick")


def test_non_finite_values_are_left_out() -> None:
    points = [*series(3, timedelta(seconds=1)), (START + timedelta(seconds=9), float("nan"))]
    assert len(vertices(parse(render_line_chart(points, title="x", unit="y")))) == 3


def test_dense_readings_draw_the_line_without_markers() -> None:
    most = ChartLayout().max_markers
    root = parse(render_line_chart(series(most + 1, timedelta(seconds=10)), title="x", unit="y"))
    assert len(vertices(root)) == most + 1
    assert root.find(f".//{SVG}circle") is None
    assert (
        len(
            parse(render_line_chart(series(most, timedelta(seconds=10)), title="x", unit="y")).findall(
                f".//{SVG}circle"
            )
        )
        == most
    )


HOSTILE = "</text><script>alert(\"x\")</script><text a='1'>&amp;\x00\x1b"


def test_hostile_text_is_escaped_everywhere() -> None:
    svg = render_line_chart(
        series(3, timedelta(seconds=10)), title=HOSTILE, unit=HOSTILE, description=f"Gas left of {HOSTILE}"
    )
    root = parse(svg)  # still well-formed XML
    assert root.find(f".//{SVG}script") is None
    assert "<script" not in svg
    expected = HOSTILE.replace("\x00", "").replace("\x1b", "")
    assert texts(root, "chart-title") == [f"{expected} ({expected})"]
    title = root.find(f"{SVG}title")
    assert title is not None and title.text == f"Gas left of {expected}"
    empty = parse(render_line_chart([], title=HOSTILE, unit="", description=HOSTILE))
    assert texts(empty, "chart-title") == [expected]


def test_escape_is_safe_in_attributes_too() -> None:
    assert escape("a\"b'c<d>&") == "a&quot;b&#x27;c&lt;d&gt;&amp;"
    ET.fromstring(f'<x y="{escape(HOSTILE)}"/>')


# -- the bottle's scale and gaps ---------------------------------------------------------------------------


def value_ticks(root: ET.Element) -> list[float]:
    return [float(text) for text in texts(root, "value-tick")]


def all_vertices(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [
        [(float(x), float(y)) for x, y in (pair.split(",") for pair in line.get("points", "").split())]
        for line in root.iter(f"{SVG}polyline")
    ]


def test_a_bottle_range_keeps_sensor_noise_flat() -> None:
    """0.03 mol of noise on 310 mol: fitted to the data it fills the chart; on the bottle's scale it is flat."""
    noisy = [(START + timedelta(seconds=10 * i), 310.0 + (0.03 if i % 2 else 0.0)) for i in range(40)]
    plot_height = ChartLayout().plot_height
    zoomed = parse(render_line_chart(noisy, title="Gas left", unit="mol"))
    zoomed_ys = [y for _, y in vertices(zoomed)]
    assert max(zoomed_ys) - min(zoomed_ys) > plot_height / 2  # the old look: a steep saw-tooth
    bottle = parse(render_line_chart(noisy, title="Gas left", unit="mol", value_range=(0.0, 404.5)))
    ticks = value_ticks(bottle)
    assert ticks[0] == 0.0 and ticks[-1] >= 404.5
    ys = [y for _, y in vertices(bottle)]
    assert max(ys) - min(ys) < 1.0  # under a pixel


def test_a_range_never_hides_points_beyond_it() -> None:
    over = series(10, timedelta(seconds=10), first=240.0, slope=1.0)  # above the 200 bar nominal
    root = parse(render_line_chart(over, title="Pressure", unit="bar", value_range=(0.0, 200.0)))
    ticks = value_ticks(root)
    assert ticks[0] == 0.0 and ticks[-1] >= 249.0
    y_axis = next(n for n in root.iter(f"{SVG}line") if "y-axis" in (n.get("class") or ""))
    top = float(y_axis.get("y1", "0"))
    assert all(y >= top for _, y in vertices(root))


def test_the_line_breaks_where_readings_are_further_apart_than_the_gap() -> None:
    before = series(10, timedelta(seconds=10))
    after = [(t + timedelta(minutes=10), v) for t, v in series(5, timedelta(seconds=10))]
    points = before + after
    joined = parse(render_line_chart(points, title="Gas left", unit="mol"))
    assert [len(line) for line in all_vertices(joined)] == [15]
    broken = parse(render_line_chart(points, title="Gas left", unit="mol", max_gap=timedelta(seconds=30)))
    assert [len(line) for line in all_vertices(broken)] == [10, 5]
    group = broken.find(f".//{SVG}g[@class='series-group']")
    assert group is not None and group.get("data-segments") == "2"
    # The first line ends left of where the second starts: nothing is drawn across the silence.
    first, second = all_vertices(broken)
    assert first[-1][0] < second[0][0]


def test_readings_exactly_the_gap_apart_stay_joined() -> None:
    points = series(4, timedelta(seconds=30))
    root = parse(render_line_chart(points, title="P", unit="bar", max_gap=timedelta(seconds=30)))
    assert [len(line) for line in all_vertices(root)] == [4]


def test_a_lone_reading_between_gaps_is_marked_even_among_dense_ones() -> None:
    dense = series(300, timedelta(seconds=10))  # too dense for a circle on each reading
    lone = (dense[-1][0] + timedelta(hours=1), 250.0)
    root = parse(render_line_chart([*dense, lone], title="P", unit="bar", max_gap=timedelta(seconds=30)))
    assert [len(line) for line in all_vertices(root)] == [300, 1]
    marks = root.find(f".//{SVG}g[@class='points lone']")
    assert marks is not None and len(marks.findall(f"{SVG}circle")) == 1
