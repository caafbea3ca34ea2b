"""One peer of `WanNet.all_to_all_s` (p2pfed/bench/wan.py), run inside its network namespace: raw TCP for scale.

    python -m p2pfed.bench.all_to_all ME ADDRESS,ADDRESS,... SIZE

Its stdout is a stage protocol with the harness, one word a line: it listens and says `listening`; on `connect` (a
line on stdin) it opens a connection to every other peer and sends 1 MB on it (TCP's window opens, as on an
averager's long-lived connections), then says `ready` once every other peer's 1 MB has arrived; on `go` it sends
SIZE bytes to every other peer at once while receiving theirs, and writes the seconds until every byte has arrived.
It exits non-zero, writing no seconds, when a peer's bytes fall short.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

PORT = 5998
WARM = 1 << 20  # bytes sent on each connection before the timed transfer


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    me, addresses, size = int(argv[0]), argv[1].split(","), int(argv[2])
    others = [a for i, a in enumerate(addresses) if i != me]
    server = socket.create_server((addresses[me], PORT), backlog=len(others))
    received: list[int] = []  # bytes after the warm-up, per closed connection
    warmed: list[socket.socket] = []  # connections whose warm-up bytes have all arrived

    def read(conn: socket.socket) -> None:
        n = 0
        while chunk := conn.recv(1 << 16):
            n += len(chunk)
            if n >= WARM and len(chunk) > n - WARM:  # this chunk completed the warm-up
                warmed.append(conn)
        received.append(n - WARM)

    def serve() -> None:
        for _ in others:
            threading.Thread(target=read, args=(server.accept()[0],)).start()

    def send(conn: socket.socket) -> None:
        conn.sendall(bytes(size))
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    _say("listening")
    sys.stdin.readline()
    conns = [socket.create_connection((a, PORT), 10) for a in others]
    for conn in conns:
        conn.sendall(bytes(WARM))
    while len(warmed) < len(others):
        time.sleep(0.002)
    _say("ready")
    sys.stdin.readline()
    start = time.monotonic()
    senders = [threading.Thread(target=send, args=(c,)) for c in conns]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    while len(received) < len(others):
        time.sleep(0.002)
    if received != [size] * len(others):
        sys.stderr.write(f"received {received} bytes, expected {size} from each of {len(others)} peers\n")
        return 1
    _say(str(time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
