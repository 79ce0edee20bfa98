"""Loads generated with wrk, and the rows they make: throughput, and latency under concurrency."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from .measure import Spread, WrkResult, interleaved, ratios, wrk
from .report import Figure, Target

WARM_SECONDS = 1.0
CONCURRENCY = 32
CONCURRENT_REQUESTS = 2000
#: The time limit of a fixed-count run; it normally ends well before.
CONCURRENT_SECONDS = 60.0


class Rate:
    """Requests/s on ``url``, one wrk run per call (warmed up once first); runs with errors are refused.

    With ``cpu`` (CPU seconds used so far by the server), the server's CPU µs per request are
    kept too: steadier than requests/s on a busy machine.
    """

    def __init__(self, url: str, workdir: Path, *, connections: int, seconds: float, close: bool = False,
                 cpu: Callable[[], float] | None = None) -> None:
        self.url = url
        self.seconds = seconds
        self.cpu = cpu
        self.cpu_per_request: list[float] = []
        self._wrk = functools.partial(wrk, url, workdir, connections=connections, close=close)
        self._wrk(seconds=WARM_SECONDS)

    def __call__(self) -> float:
        used = self.cpu() if self.cpu else 0.0
        result = self._wrk(seconds=self.seconds)
        if result.errors:
            raise RuntimeError(f"{self.url}: {result.errors} errors in {result.requests} requests")
        if self.cpu:
            self.cpu_per_request.append((self.cpu() - used) / result.requests * 1e6)
        return result.rate


def cpu_note(server: list[float], baseline: list[float], name: str = "gunicorn") -> str:
    """The CPU per request (µs) of two servers (``name``'s workers), as a note."""
    return (f"{name} workers' CPU {Spread.of(server).median:.0f} µs/request against "
            f"{Spread.of(baseline).median:.0f} µs")


def throughput(name: str, baseline_label: str, samples: dict[str, list[float]], value: str, baseline: str,
               target: float, *, unit: str = "requests/s", note: str = "") -> Figure:
    """The row comparing ``samples[value]`` with ``samples[baseline]``, held to ``ratio >= target``."""
    return Figure(name, unit, baseline_label, Spread.of(samples[baseline]), Spread.of(samples[value]),
                  Spread.of(ratios(samples[value], samples[baseline])), Target("ratio", ">=", target), note=note)


def concurrency(name: str, baseline_label: str, url: str, baseline_url: str, workdir: Path, repeat: int,
                target: Target | None = None, cpu: dict[str, Callable[[], float]] | None = None) -> Figure:
    """7. ``CONCURRENCY`` clients sending ``CONCURRENT_REQUESTS`` requests: p99 latency against the
    baseline's, held to ``target`` (runs with an error are then refused), or else to no error at all.
    With ``cpu`` (``"value"`` and ``"baseline"``: the CPU seconds their servers used so far), the
    note gives each server's CPU per request."""
    runs: dict[str, list[WrkResult]] = {"value": [], "baseline": []}
    cpu_per_request: dict[str, list[float]] = {"value": [], "baseline": []}

    def run(which: str, target_url: str) -> Callable[[], float]:
        def once() -> float:
            used = cpu[which]() if cpu else 0.0
            result = wrk(target_url, workdir, connections=CONCURRENCY, seconds=CONCURRENT_SECONDS,
                         count=CONCURRENT_REQUESTS)
            if target is not None and which == "value" and result.errors:
                raise RuntimeError(f"{target_url}: {result.errors} errors in {result.requests} requests")
            if cpu:
                cpu_per_request[which].append((cpu[which]() - used) / result.requests * 1e6)
            runs[which].append(result)
            return result.p99_ms
        return once

    samples = interleaved(repeat, {"value": run("value", url), "baseline": run("baseline", baseline_url)})
    p50 = {which: Spread.of([result.p50_ms for result in results]).median for which, results in runs.items()}
    rates = Spread.of(ratios([result.rate for result in runs["value"]], [result.rate for result in runs["baseline"]]))
    baseline_errors = sum(result.errors for result in runs["baseline"])
    note = (f"p50 {p50['value']:.2f} ms against {p50['baseline']:.2f} ms; requests/s {rates.median:.3g} "
            f"[{rates.low:.3g}–{rates.high:.3g}] of the baseline's; {CONCURRENT_REQUESTS} requests per run"
            + (f"; {baseline_errors} errors in the baseline" if baseline_errors else "")
            + (f"; workers' CPU {Spread.of(cpu_per_request['value']).median:.0f} µs/request against "
               f"{Spread.of(cpu_per_request['baseline']).median:.0f} µs" if cpu else ""))
    ratio = Spread.of(ratios(samples["value"], samples["baseline"]))
    if target is not None:
        return Figure(name, "p99 ms", baseline_label, Spread.of(samples["baseline"]), Spread.of(samples["value"]),
                      ratio, target, note=note)
    return Figure(name, "p99 ms", baseline_label, Spread.of(samples["baseline"]), Spread.of(samples["value"]),
                  ratio, Target("errors", "==", 0, worst=True),
                  Spread.of([float(result.errors) for result in runs["value"]]), note)
