"""gunicorn settings for Prometheus metrics with several workers (``gunicorn -c examples/gunicorn_metrics.py``).

Each worker counts in files under ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess
mode), and every scrape sums them, whichever worker or port answers it. The directory is made
here when the environment gives none (and removed when gunicorn exits), and emptied at start
when it does: counts of an earlier run must not be added to this one's. Only at start: gunicorn
reads this file again on SIGHUP, and the counts go on across that reload; and not in the new
master of a USR2 upgrade (``GUNICORN_PID`` names the old one), whose workers still count there,
so the counts go on across it too (in a directory made here, they start afresh).
"""

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

# Before prometheus_client is imported, here or in a worker: it picks its storage at import.
if not os.environ.get("MOGILE_METRICS_DIR_READY"):  # this master's first reading of the file
    os.environ["MOGILE_METRICS_DIR_READY"] = "1"
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if not os.environ.get("GUNICORN_PID"):  # emptied, its files unlinked, the old master's workers counted in vain
            for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
                stale.unlink()
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mogile-metrics-")
        os.environ["MOGILE_METRICS_DIR_MADE"] = "1"

from prometheus_client import multiprocess, start_http_server  # noqa: E402

workers = 2
#: The master's own metrics port (METRICS_PORT=0: none), so a scrape never waits behind requests.
metrics_port = int(os.environ.get("METRICS_PORT", "9101"))


def when_ready(server):
    if metrics_port:
        from mogile_middleware.prometheus import registry

        collected = registry()
        try:
            start_http_server(metrics_port, addr="127.0.0.1", registry=collected)
        except OSError as error:  # taken, as by the old master during a USR2 upgrade: the site is served all the same
            server.log.warning("metrics port %d: %s; served once it is free", metrics_port, error)
            threading.Thread(target=serve_once_free, args=(collected,), daemon=True).start()


def serve_once_free(collected):
    """Serve the metrics on the master's port once it is free. Nothing is logged or imported here:
    a lock this thread held as gunicorn forked a worker would stay held in the worker."""
    while True:
        time.sleep(1)
        try:
            start_http_server(metrics_port, addr="127.0.0.1", registry=collected)
            return
        except OSError:
            pass


def on_exit(server):
    if os.environ.get("MOGILE_METRICS_DIR_MADE"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def child_exit(server, worker):
    # A worker's gauges leave with it; its counters stay in the sums.
    multiprocess.mark_process_dead(worker.pid)
