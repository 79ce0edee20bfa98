"""Measuring: repetitions interleaved between variants, spreads, time limits, and ``wrk`` runs."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Reported by wrk's ``done`` hook as one JSON line (durations and latencies in microseconds).
_SUMMARY_LUA = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "status_errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""

#: With a count given after ``--``, the (single) wrk thread stops after that many responses, and
#: wakes wrk's main thread, which would otherwise sleep out the whole duration. system() ignores
#: SIGINT while its command runs, hence the signal sent from a background job a little later.
_COUNT_LUA = _SUMMARY_LUA + """
local quota, seen = math.huge, 0
function init(args)
  quota = tonumber(args[1])
end
function response(status, headers, body)
  seen = seen + 1
  if seen == quota then
    wrk.thread:stop()
    os.execute("(sleep 0.05; kill -INT $PPID) &")
  end
end
"""


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements, with their minimum and maximum."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        return cls(statistics.median(samples), min(samples), max(samples))


class Deadline:
    """Bounds a loop in time as well as in count: :meth:`check` raises once ``seconds`` have passed."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.what = what

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"{self.what} took longer than its time limit")


def rotated(items: list[T], turn: int) -> list[T]:
    """``items`` rotated by ``turn``: each takes every place in turn, so that order effects even out."""
    turn %= len(items)
    return items[turn:] + items[:turn]


def interleaved(repeat: int, variants: Mapping[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every variant once per repetition, in rotating order, so drift hits them all alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeat):
        for name in rotated(list(variants), rep):
            samples[name].append(variants[name]())
    return samples


def ratios(values: list[float], baselines: list[float]) -> list[float]:
    """Per-repetition ratios of paired measurements."""
    return [value / baseline for value, baseline in zip(values, baselines)]


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run saw."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, workdir: Path, *, connections: int, seconds: float, count: int | None = None,
        close: bool = False, lua: str = "") -> WrkResult:
    """Load ``url`` with wrk for ``seconds`` (or until ``count`` responses, whichever comes first).

    ``close`` asks for a new connection per request; ``lua`` adds to wrk's script (e.g. a
    ``request()`` choosing the path). Errors are socket errors plus answers other than 2xx and 3xx.
    """
    text = (_COUNT_LUA if count else _SUMMARY_LUA) + lua
    script = workdir / f"wrk-{hashlib.sha1(text.encode()).hexdigest()[:12]}.lua"
    if not script.exists():
        script.write_text(text)
    argv = ["wrk", "--threads=1", f"--connections={connections}", f"--duration={seconds:g}s",
            "--timeout=10s", "--latency", f"--script={script}", url]
    if close:
        argv.insert(1, "--header=Connection: close")
    if count:
        argv += ["--", str(count)]
    output = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    summary = json.loads(output.strip().splitlines()[-1])
    return WrkResult(summary["requests"], summary["duration_us"] / 1e6,
                     summary["socket_errors"] + summary["status_errors"],
                     summary["p50_us"] / 1000, summary["p99_us"] / 1000)
