"""Helper processes that die with their peer.

    start_lifeline()      # first thing in a child process's run()

hivemind runs a peer's DHT and averager in processes of their own, and the libp2p daemon as a child of the DHT's.
When the peer's main process dies without stopping them (kill -9, the OOM killer), they would go on for minutes,
holding ports and memory. A lifeline is a daemon thread in such a child: as soon as the child's parent is gone (the
kernel re-parents an orphan, so getppid changes), it kills the child's own children and exits the child. Linux only
(it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["children_of", "start_lifeline"]

POLL_S = 0.5


def start_lifeline(poll_s: float = POLL_S) -> None:
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                for pid in children_of(os.getpid()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os._exit(1)

    threading.Thread(target=watch, name="p2pfed-lifeline", daemon=True).start()


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found
