"""The concurrency plot of 10g–h as an SVG file: requests/s and p99 against the number of clients.

Written by hand in SVG (two panels of lines, log scale in clients) so that the bench needs no
plotting library.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

#: One curve: ``(clients, requests/s, p99 ms)`` per concurrency.
Curve = list[tuple[int, float, float]]

PANEL_WIDTH, PANEL_HEIGHT = 330, 220
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM, GAP = 60, 46, 45, 70
LEGEND_HEIGHT = 22
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
#: Curves are named "<server>, <what>": one colour per server; the baselines ("in memory") dashed.
DASHED = "in memory"


def concurrency_svg(path: Path, curves: dict[str, Curve], title: str) -> None:
    """Write the plot of ``curves`` (by name) to ``path``."""
    clients = sorted({point[0] for curve in curves.values() for point in curve})
    servers = list(dict.fromkeys(name.split(",")[0] for name in curves))
    colours = {name: COLOURS[servers.index(name.split(",")[0]) % len(COLOURS)] for name in curves}
    width = MARGIN_LEFT + 2 * PANEL_WIDTH + GAP + 20
    height = MARGIN_TOP + PANEL_HEIGHT + MARGIN_BOTTOM + LEGEND_HEIGHT * ((len(curves) + 1) // 2) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for panel, (label, index) in enumerate((("requests/s", 1), ("p99 ms", 2))):
        left = MARGIN_LEFT + panel * (PANEL_WIDTH + GAP)
        top = MARGIN_TOP
        highest = max(point[index] for curve in curves.values() for point in curve) * 1.1
        parts += _axes(left, top, clients, highest, label)
        for name, curve in curves.items():
            points = " ".join(f"{_x(left, clients, n):.1f},{_y(top, highest, value[index - 1]):.1f}"
                              for n, *value in curve)
            dash = ' stroke-dasharray="5,4"' if DASHED in name else ""
            colour = colours[name]
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            parts += [f'<circle cx="{_x(left, clients, n):.1f}" cy="{_y(top, highest, value[index - 1]):.1f}" '
                      f'r="3" fill="{colour}"/>' for n, *value in curve]
    legend_top = MARGIN_TOP + PANEL_HEIGHT + MARGIN_BOTTOM
    for number, name in enumerate(curves):
        x = MARGIN_LEFT + (number % 2) * (PANEL_WIDTH + GAP)
        y = legend_top + (number // 2) * LEGEND_HEIGHT
        dash = ' stroke-dasharray="5,4"' if DASHED in name else ""
        parts += [f'<line x1="{x}" y1="{y}" x2="{x + 30}" y2="{y}" stroke="{colours[name]}" '
                  f'stroke-width="2"{dash}/>', f'<text x="{x + 38}" y="{y + 4}">{escape(name)}</text>']
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def _x(left: float, clients: list[int], n: int) -> float:
    """Where ``n`` clients go on a log scale spanning ``clients``."""
    low, high = math.log(clients[0]), math.log(clients[-1])
    return left + (math.log(n) - low) / ((high - low) or 1) * PANEL_WIDTH


def _y(top: float, highest: float, value: float) -> float:
    return top + PANEL_HEIGHT - value / highest * PANEL_HEIGHT


def _axes(left: float, top: float, clients: list[int], highest: float, label: str) -> list[str]:
    """A panel's frame, its ticks (every concurrency; five steps up) and its labels."""
    bottom = top + PANEL_HEIGHT
    parts = [f'<rect x="{left}" y="{top}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>']
    for n in clients:
        x = _x(left, clients, n)
        parts += [f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#999"/>',
                  f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{n}</text>']
    step = _round_step(highest / 5)
    value = 0.0
    while value <= highest:
        y = _y(top, highest, value)
        parts += [f'<line x1="{left}" y1="{y:.1f}" x2="{left + PANEL_WIDTH}" y2="{y:.1f}" stroke="#eee"/>',
                  f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,.0f}</text>']
        value += step
    parts += [f'<text x="{left + PANEL_WIDTH / 2}" y="{bottom + 32}" text-anchor="middle">clients</text>',
              f'<text x="{left}" y="{top - 6}">{escape(label)}</text>']
    return parts


def _round_step(raw: float) -> float:
    """``raw`` rounded up to 1, 2 or 5 times a power of ten."""
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
