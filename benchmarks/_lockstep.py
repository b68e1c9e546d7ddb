"""One host of the raw-TCP reference for ``scaling.py``: the one-peer exponential pattern, no gRPC.

Every step ``k`` host ``i`` sends ``--bytes`` to ``(i + 2^(k mod log2 n)) mod n`` and waits for the
same amount from ``(i - 2^(k mod log2 n)) mod n``, then sleeps ``--compute-seconds``: the data
dependency of synchronous one-peer exponential gossip (a host can send step ``k`` only after it
received step ``k - 1``), over plain TCP sockets, one per ordered pair, with nothing else in
the way. Prints one JSON line: ``{"rank", "median_step_seconds", "mean_step_seconds"}`` (the
first two steps, while connections warm up, left out).

    python benchmarks/_lockstep.py --rank R --addresses A0,A1,... --bytes B --steps K
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time

PORT = 5997


def _offsets(n: int) -> list[int]:
    offsets, offset = [], 1
    while offset < n:
        offsets.append(offset)
        offset *= 2
    return offsets


def _connect(address: str, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((address, PORT), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--addresses", required=True, help="comma-separated, in rank order")
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compute-seconds", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    addresses = args.addresses.split(",")
    n, rank = len(addresses), args.rank
    offsets = _offsets(n)
    sources = {(rank - off) % n for off in offsets}
    listener = socket.create_server(("0.0.0.0", PORT), backlog=n)
    listener.settimeout(args.timeout)
    deadline = time.monotonic() + args.timeout
    outgoing = {}
    for dest in sorted({(rank + off) % n for off in offsets}):
        sock = _connect(addresses[dest], deadline)
        sock.sendall(rank.to_bytes(4, "big"))  # say who we are
        outgoing[dest] = sock
    incoming: dict[int, socket.socket] = {}
    while len(incoming) < len(sources):
        sock, _ = listener.accept()
        sock.settimeout(args.timeout)
        incoming[int.from_bytes(sock.recv(4, socket.MSG_WAITALL), "big")] = sock
    payload = bytes(args.bytes)
    received = memoryview(bytearray(args.bytes))
    durations = []
    for k in range(args.steps):
        started = time.monotonic()
        off = offsets[k % len(offsets)]
        sender = threading.Thread(target=outgoing[(rank + off) % n].sendall, args=(payload,))
        sender.start()
        source, got = incoming[(rank - off) % n], 0
        while got < args.bytes:
            chunk = source.recv_into(received[got:], args.bytes - got)
            if not chunk:
                print(f"_lockstep.py: peer {(rank - off) % n} closed", file=sys.stderr)
                return 1
            got += chunk
        sender.join()
        time.sleep(args.compute_seconds)
        durations.append(time.monotonic() - started)
    time.sleep(1.0)  # let the last sends drain before closing
    steady = durations[2:] or durations
    print(json.dumps({"rank": rank, "median_step_seconds": statistics.median(steady),
                      "mean_step_seconds": statistics.mean(steady)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
