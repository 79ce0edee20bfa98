"""Figures against their targets: the table (reStructuredText, printed and published) and the JSON."""

from __future__ import annotations

import json
import operator
import os
import platform
import subprocess
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


def _cell(spread: Spread) -> str:
    return f"{_number(spread.median)} [{_number(spread.low)}–{_number(spread.high)}]"


def table(figures: list[Figure]) -> str:
    """The figures as a reStructuredText simple table (medians, [min–max] over the repetitions)."""
    head = ["Figure", "Unit", "Baseline", "Baseline value", "Measured", "Ratio", "Target", "Result"]
    rows = [[f.name, f.unit, f.baseline_label, _cell(f.baseline), _cell(f.value), _cell(f.ratio), str(f.target),
             f.result] for f in figures]
    widths = [max(len(row[column]) for row in [head, *rows]) for column in range(len(head))]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(head), rule, *map(line, rows), rule])


def notes(figures: list[Figure]) -> str:
    """The figures' notes, one per line, after their names."""
    return "\n".join(f"* {f.name}: {f.note}" for f in figures if f.note)


def write_json(path: Path, figures: list[Figure], settings: dict[str, Any], seconds: float) -> None:
    """Save the run: every figure with its samples' spreads, the machine and the settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
               "cores": len(os.sched_getaffinity(0)), "perlbal": _first_line(["perlbal", "--version"]),
               "wrk": _first_line(["wrk", "--version"])}
    figures_json = [{**asdict(f), "target": str(f.target), "result": f.result} for f in figures]
    document = {"machine": machine, "settings": settings, "seconds": round(seconds, 1), "figures": figures_json}
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
