"""``python -m bench``: measure every figure against its baseline, print the table, save the JSON."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import devnode, growth, inprocess, reproxy, scaling, serving, slow_clients, workers
from .cluster import MEDIUM_KEY, MEDIUM_SIZE, PERLBAL_OPTIONS, SMALL_KEY, SMALL_SIZE, cluster
from .report import RESULTS, Figure, notes, row, table, write_json
from .servers import FRONT_SETTINGS, WORKERS

PROGRAMS = ("wrk", "perlbal", "memcached")
MODULES = ("gunicorn", "uvicorn", "pymemcache", "paste.deploy")
#: The plot of 10g–h, beside the JSON.
PLOT = "concurrency.svg"


def main() -> int:
    """Run the benchmarks; the exit status is 0 even when targets are missed (the table says so)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure every figure against a baseline of the same run.")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of every measurement (default: 5)")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="the JSON file (default: bench/results/latest.json)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    missing += [module for module in MODULES if importlib.util.find_spec(module) is None]
    if missing:
        parser.error(f"not installed: {', '.join(missing)}")
    started = time.monotonic()
    figures: list[Figure] = []
    with cluster() as mogile:
        mogile.store(SMALL_KEY, SMALL_SIZE)
        mogile.store(MEDIUM_KEY, MEDIUM_SIZE)
        steps: list[tuple[str, Callable[[], list[Figure]]]] = [
            ("1. hot path", lambda: [
                inprocess.hot_path(mogile, args.repeat, "1a. hot path, open", {"reproxy": "perlbal"}),
                inprocess.hot_path(mogile, args.repeat, "1b. hot path, trusted_proxies", PERLBAL_OPTIONS)]),
            ("3. cache miss", lambda: [inprocess.cache_miss(mogile, args.repeat)]),
            ("6. upload", lambda: inprocess.upload(mogile, args.repeat)),
            ("2, 5, 7a. reproxy", lambda: reproxy.reproxy(mogile, args.repeat)),
            ("4, 8c. serve mode", lambda: serving.serve(mogile, args.repeat)),
            ("7b–c. serve mode, 32 clients", lambda: serving.small_files(mogile, args.repeat)),
            ("8a. ASGI hot path", lambda: [
                inprocess.asgi_hot_path(mogile, args.repeat, "8a. ASGI hot path, trusted_proxies", PERLBAL_OPTIONS)]),
            ("8b. reproxy under uvicorn", lambda: [reproxy.asgi_reproxy(mogile, args.repeat)]),
            ("8d. slow clients", lambda: slow_clients.slow_clients(mogile, args.repeat)),
            ("9. development storage node", lambda: devnode.devnode(mogile, args.repeat)),
            ("10a–b. path cache growth", lambda: growth.path_cache(mogile, args.repeat)),
            ("10c–d. workers sharing memcached", lambda: workers.shared_cache(mogile, args.repeat)),
            ("10e–f. tracker client, 64 threads", lambda: scaling.threaded_client(mogile, args.repeat)),
            ("10g–h. serve mode, 1 to 128 clients", lambda: scaling.serve_clients(
                mogile, args.repeat, args.output.with_name(PLOT))),
        ]
        for title, step in steps:
            print(f"{title}...", file=sys.stderr, flush=True)
            figures += step()
    figures.sort(key=_numbered)
    seconds = time.monotonic() - started
    rows = [row(figure) for figure in figures]
    print(table(rows))
    print(notes(rows))
    print(f"{len(figures)} figures, {sum('PASS' in f.result for f in figures)} targets met, in {seconds:.0f} s")
    settings = {"repeat": args.repeat, "gunicorn_workers": WORKERS, "perlbal_options": PERLBAL_OPTIONS,
                "uvicorn": {"workers": {"8b": reproxy.ASGI_WORKERS, "8c": 1, "8d": 1},
                            "http": _installed("httptools", "h11"), "loop": _installed("uvloop", "asyncio")},
                "storage": "one Perlbal web_server node, one replica per key", "front": list(FRONT_SETTINGS),
                "wrk_seconds": {"straight": reproxy.STRAIGHT_SECONDS, "perlbal": reproxy.FRONT_SECONDS},
                "wrk_runs_per_repeat": {"straight": reproxy.STRAIGHT_RUNS}}
    write_json(args.output, figures, settings, seconds)
    print(f"saved {args.output}", file=sys.stderr)
    return 0


def _numbered(figure: Figure) -> list[int | str]:
    """The order of figures by the numbers in their names, so that 10a comes after 9b and
    8 clients before 32."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", figure.name)]


def _installed(module: str, otherwise: str) -> str:
    """``module`` if it is installed, else ``otherwise``: what uvicorn picks by default."""
    return module if importlib.util.find_spec(module) is not None else otherwise


if __name__ == "__main__":
    sys.exit(main())
