"""The development tracker with external storage nodes as its devices, run as a child process.

``python -m bench.tracker --data DIR --port PORT --domain D --class NAME=N... --node PORT...``
serves until SIGTERM. Device N is ``devN`` on the node at the N-th ``--node`` port. It counts the
commands it answers, by name: the admin line :data:`COUNTS_LINE` lists them (:func:`command_counts`).
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from collections import Counter
from pathlib import Path

from mogile_middleware.devserver import DevMogileFS, MetadataStore, TrackerServer

HOST = "127.0.0.1"
#: The admin line answered with one ``command count`` line per command answered so far, then ``.``.
COUNTS_LINE = b"!counts"


def count_commands(tracker: TrackerServer) -> None:
    """Count the commands ``tracker`` answers, and answer :data:`COUNTS_LINE` with the counts."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    answer = tracker.answer

    def counting(line: bytes) -> bytes:
        if line == COUNTS_LINE:
            with lock:
                lines = [f"{command} {count}\r\n" for command, count in counts.items()]
            return "".join([*lines, ".\r\n"]).encode("ascii")
        with lock:
            counts[line.partition(b" ")[0].decode("ascii", "replace")] += 1
        return answer(line)

    tracker.answer = counting  # type: ignore[method-assign]


def command_counts(address: str) -> Counter[str]:
    """How many of each command the tracker at ``host:port`` has answered (see :func:`count_commands`)."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as replies:
        sock.sendall(COUNTS_LINE + b"\r\n")
        counts: Counter[str] = Counter()
        while (line := replies.readline().strip()) != b".":
            if not line:
                raise ConnectionError(f"the tracker at {address} closed the connection amid its counts")
            command, count = line.decode("ascii").split()
            counts[command] = int(count)
    return counts


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
                     domains={args.domain: classes}) as mogile:
        assert mogile.tracker is not None
        count_commands(mogile.tracker)
        stopping.wait()


if __name__ == "__main__":
    main()
