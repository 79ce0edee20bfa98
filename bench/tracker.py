"""The development tracker with external storage nodes as its devices, run as a child process.

``python -m bench.tracker --data DIR --port PORT --domain D --class NAME=N... --node PORT...``
serves until SIGTERM. Device N is ``devN`` on the node at the N-th ``--node`` port.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from mogile_middleware.devserver import DevMogileFS, MetadataStore

HOST = "127.0.0.1"


def main() -> None:
    """Register the nodes, then run the tracker until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.tracker")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME=MINDEVCOUNT")
    parser.add_argument("--node", dest="nodes", type=int, action="append", default=[], metavar="PORT")
    args = parser.parse_args()
    classes = {name: int(count) for name, _, count in (text.partition("=") for text in args.classes)}
    # Devices are in the database before the tracker listens, so no client ever sees it without them.
    store = MetadataStore(args.data / "tracker" / "mogilefs.sqlite3")
    for devid, port in enumerate(args.nodes, 1):
        store.register_device(devid, f"stor{devid}", HOST, port)
    store.close()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    with DevMogileFS(args.data, host=HOST, tracker_port=args.port, storage_ports=[],
                     domains={args.domain: classes}):
        stopping.wait()


if __name__ == "__main__":
    main()
