"""Figures against their targets: the table (reStructuredText, printed and published) and the JSON.

``python -m bench.report [RUN.json]`` prints the table of a saved run (by default the last one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import operator
import os
import platform
import re
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .measure import Spread

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    """``quantity op limit`` (``ratio >= 0.95``), judged on the median, or on the worst repetition
    for bounds that every repetition must keep (``errors == 0``)."""

    quantity: str
    op: str
    limit: float
    unit: str = ""
    stretch: float | None = None
    worst: bool = False

    def judged(self, spread: Spread) -> float:
        """The value of ``spread`` that decides."""
        if not self.worst:
            return spread.median
        return spread.low if self.op == ">=" else spread.high

    def met(self, spread: Spread, limit: float | None = None) -> bool:
        return _OPERATORS[self.op](self.judged(spread), self.limit if limit is None else limit)

    def __str__(self) -> str:
        text = f"{self.quantity} {self.op} {self.limit:g}{self.unit}"
        return text + (f" (stretch {self.stretch:g})" if self.stretch is not None else "")


@dataclass(frozen=True)
class Figure:
    """One row: a measurement against the baseline of the same run, and the target it is held to."""

    name: str
    unit: str
    baseline_label: str
    baseline: Spread
    value: Spread
    ratio: Spread
    target: Target
    #: What the target is about when it is not the ratio (e.g. an overhead or an error count).
    target_quantity: Spread | None = None
    note: str = ""

    @property
    def checked(self) -> Spread:
        return self.ratio if self.target_quantity is None else self.target_quantity

    @property
    def result(self) -> str:
        verdict = "PASS" if self.target.met(self.checked) else "MISS"
        if self.target.quantity != "ratio":
            verdict += f" ({_number(self.target.judged(self.checked))}{self.target.unit})"
        if self.target.stretch is not None and self.target.met(self.checked):
            verdict += ", stretch met" if self.target.met(self.checked, self.target.stretch) else ", stretch missed"
        return verdict


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


#: Where a run is saved by default.
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
#: The columns of the table and their widths: with the borders, as wide as the README's text.
COLUMNS = (("Figure", 26), ("Measured (baseline)", 25), ("Ratio [min–max]", 17), ("Target: result", 19))


def row(figure: Figure) -> dict[str, Any]:
    """``figure`` as plain values: what the JSON keeps and the table shows."""
    return {**asdict(figure), "target": str(figure.target), "result": figure.result}


def table(rows: list[dict[str, Any]]) -> str:
    """The figures (as :func:`row` gives them, or as the JSON keeps them) as a reStructuredText grid
    table: medians, and each ratio's [min–max] over the repetitions."""
    cells = [[name for name, _ in COLUMNS]] + [[
        re.sub(r"^(\d+)\. ", r"\1\\. ", f["name"]),  # "2. reproxy ...": text, not an enumerated list
        f"{_number(f['value']['median'])} {f['unit']} against {_number(f['baseline']['median'])} "
        f"({f['baseline_label']})",
        f"{_number(f['ratio']['median'])} [{_number(f['ratio']['low'])}–{_number(f['ratio']['high'])}]",
        f"{f['target']}: {f['result']}",
    ] for f in rows]
    widths = [width for _, width in COLUMNS]

    def rule(fill: str) -> str:
        return "+" + "+".join(fill * (width + 2) for width in widths) + "+"

    lines = [rule("-")]
    for number, texts in enumerate(cells):
        wrapped = [textwrap.wrap(text, width, break_on_hyphens=False) or [""] for text, width in zip(texts, widths)]
        for line in itertools.zip_longest(*wrapped, fillvalue=""):
            lines.append("| " + " | ".join(part.ljust(width) for part, width in zip(line, widths)) + " |")
        lines.append(rule("=" if number == 0 else "-"))
    return "\n".join(lines)


def notes(rows: list[dict[str, Any]]) -> str:
    """The figures' notes (of :func:`row` or the JSON), one per line, after their names."""
    return "\n".join(f"* {f['name']}: {f['note']}" for f in rows if f["note"])


def write_json(path: Path, figures: list[Figure], settings: dict[str, Any], seconds: float) -> None:
    """Save the run: every figure with its samples' spreads, the machine and the settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
               "cores": len(os.sched_getaffinity(0)), "perlbal": _first_line(["perlbal", "--version"]),
               "wrk": _first_line(["wrk", "--version"])}
    document = {"machine": machine, "settings": settings, "seconds": round(seconds, 1),
                "figures": [row(f) for f in figures]}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def _first_line(argv: list[str]) -> str:
    # wrk prints its version with a non-zero status: the output is all that counts.
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    return (result.stdout or result.stderr).strip().splitlines()[0]


def main() -> None:
    """Print the table and the notes of a saved run."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Print the table of a saved run.")
    parser.add_argument("run", nargs="?", type=Path, default=RESULTS,
                        help="the JSON file of a run (default: bench/results/latest.json)")
    document = json.loads(parser.parse_args().run.read_text())
    print(table(document["figures"]))
    print(notes(document["figures"]))


if __name__ == "__main__":
    main()
