"""Small inline SVG plots for the report: bars, lines and histograms, a few kilobytes each.

No plotting library: the report's plots are simple, and SVG scales, stays sharp, and needs nothing
at view time. Every value is escaped; colours are RGB triples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 360, 200
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 12, 48


def _rgb(color: Sequence[int]) -> str:
    return f"rgb({int(color[0])},{int(color[1])},{int(color[2])})"


def _frame(body: list[str], title: str, y_max: float, y_label: str, width: int = WIDTH, y_min: float = 0.0) -> str:
    """Axes, a y grid at quarters of [``y_min``, ``y_max``] and the body, as one ``<svg>``."""
    plot_h = HEIGHT - TOP - BOTTOM
    grid = []
    for k in range(5):
        value = y_min + (y_max - y_min) * k / 4
        y = TOP + plot_h * (1 - k / 4)
        grid.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                    f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_tick(value)}</text>')
    return (f'<svg class="plot" viewBox="0 0 {width} {HEIGHT}" width="{width}" height="{HEIGHT}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{"".join(grid)}{"".join(body)}'
            f'<text x="12" y="{TOP + plot_h / 2:.1f}" transform="rotate(-90 12 {TOP + plot_h / 2:.1f})" '
            f'text-anchor="middle">{escape(y_label)}</text></svg>')


def _tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2g}" if abs(value) < 1 else f"{value:.3g}"


def bar_chart(labels: Sequence[str], values: Sequence[float | None], colors: Sequence[Sequence[int]],
              title: str, y_label: str, y_max: float | None = None) -> str:
    """One bar per label (None: no bar, 'n/a' under it), labels turned to fit."""
    width = max(WIDTH, LEFT + RIGHT + 22 * len(labels))
    plot_w, plot_h = width - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else (max(finite) if finite and max(finite) > 0 else 1.0)
    step = plot_w / max(len(labels), 1)
    body = []
    for k, (label, value, color) in enumerate(zip(labels, values, colors)):
        x = LEFT + k * step
        if value is not None and math.isfinite(value):
            h = plot_h * min(value, top) / top
            body.append(f'<rect x="{x + step * 0.15:.1f}" y="{TOP + plot_h - h:.1f}" width="{step * 0.7:.1f}" '
                        f'height="{h:.1f}" fill="{_rgb(color)}"><title>{escape(label)}: {value:.4g}</title></rect>')
        else:
            body.append(f'<text x="{x + step / 2:.1f}" y="{TOP + plot_h - 3}" text-anchor="middle">n/a</text>')
        cx = x + step / 2
        body.append(f'<text x="{cx:.1f}" y="{TOP + plot_h + 10}" text-anchor="end" '
                    f'transform="rotate(-40 {cx:.1f} {TOP + plot_h + 10})">{escape(label[:16])}</text>')
    return _frame(body, title, top, y_label, width)


def line_chart(x: Sequence[float], series: Sequence[tuple[str, Sequence[float], Sequence[int]]], title: str,
               x_label: str, y_label: str, marks: Sequence[float | None] | None = None,
               y_max: float | None = None, zoom: bool = False) -> str:
    """Lines over a shared x; ``marks[i]`` puts a dot on series i at that x (e.g. the chosen γ).

    ``zoom`` starts the y axis at the data's minimum (rounded down to a tenth) instead of 0.
    """
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [v for _, ys, _ in series for v in ys if math.isfinite(v)]
    top = y_max if y_max is not None else (max(values) if values and max(values) > 0 else 1.0)
    bottom = min(math.floor(min(values) * 10) / 10, top - 0.1) if zoom and values else 0.0
    x0, x1 = min(x), max(x)
    span = (x1 - x0) or 1.0

    def point(xv: float, yv: float) -> tuple[float, float]:
        return LEFT + plot_w * (xv - x0) / span, TOP + plot_h * (1 - (min(yv, top) - bottom) / (top - bottom))

    body = []
    for k, (name, ys, color) in enumerate(series):
        pts = " ".join("{:.1f},{:.1f}".format(*point(xv, yv)) for xv, yv in zip(x, ys) if math.isfinite(yv))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{_rgb(color)}" stroke-width="2">'
                    f'<title>{escape(name)}</title></polyline>')
        if marks is not None and marks[k] is not None and marks[k] in x:
            px, py = point(marks[k], ys[list(x).index(marks[k])])
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{_rgb(color)}" stroke="#000">'
                        f'<title>{escape(name)}: best at {marks[k]:g}</title></circle>')
    for value in (x0, (x0 + x1) / 2, x1):
        px, _ = point(value, 0)
        body.append(f'<text x="{px:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{value:.3g}</text>')
    body.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>')
    return _frame(body, title, top, y_label, y_min=bottom)


def histogram(values: Sequence[float], bins: int, lo: float, hi: float, color: Sequence[int], title: str,
              x_label: str) -> str:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (values outside go to the end bins)."""
    counts = [0] * bins
    for value in values:
        k = int((value - lo) / (hi - lo) * bins) if hi > lo else 0
        counts[min(max(k, 0), bins - 1)] += 1
    labels = [f"{lo + (hi - lo) * k / bins:.2g}" for k in range(bins)]
    svg = bar_chart(labels, counts, [color] * bins, title, "items", y_max=4 * math.ceil(max(max(counts), 1) / 4))
    return svg.replace("</svg>", f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 2}" text-anchor="middle">'
                                 f'{escape(x_label)}</text></svg>')
