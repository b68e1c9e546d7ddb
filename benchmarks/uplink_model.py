"""Fluid model of synchronous one-peer exponential pulls over capped uplinks.

What ``benchmarks/scaling.py`` measures, without TCP: ``n`` peers, each with an uplink that moves
one model in ``transfer`` seconds. At step ``k`` peer ``p`` publishes its vector, then pulls
neighbour ``s = p - 2^(k mod log2 n)``'s step-``k`` vector (the same graph and direction as the
peers' one-peer exponential topology); the transfer starts once both have published and shares
``s``'s uplink with whatever else ``s`` is sending, either evenly (``share="even"``, what TCP
flows approximate) or oldest first (``share="oldest"``). When it ends ``p`` computes for
``compute + U(0, jitter)`` seconds and publishes step ``k + 1``. Peers start up to ``skew``
seconds apart.

The model tells whether the schedule itself loses time as ``n`` grows (README, "Scaling across
hosts": it settles at ``transfer + compute`` for every ``n``, so the losses measured with BBR
were the flows' own).

    python benchmarks/uplink_model.py [--nodes 2,4,8] [--transfer-ms 405] [--compute-ms 10]
        [--jitter-ms 10] [--skew-ms 2000] [--steps 200] [--out benchmarks/results/uplink_model.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from topology import make_topology  # noqa: E402

_EPSILON = 1e-12  # seconds: event times that differ by rounding only are the same event


@dataclass
class _Transfer:
    sender: int
    puller: int
    step: int
    started: float
    remaining: float  # fraction of one model still to send


def source(peer: int, step: int, n: int) -> int:
    """The neighbour ``peer`` pulls from at ``step`` on the one-peer exponential graph."""
    if n < 2:
        raise ValueError(f"need at least 2 peers, got {n}")
    (neighbour,) = _graph(n).graph.in_neighbors(peer, step)  # the peers' own graph
    return neighbour


@functools.cache
def _graph(n: int) -> Any:
    return make_topology("one-peer-exponential", n)


def simulate(
    n: int,
    *,
    steps: int = 200,
    transfer: float = 0.405,
    compute: float = 0.010,
    jitter: float = 0.010,
    skew: float = 2.0,
    share: str = "even",
    seed: int = 0,
) -> float:
    """Steady-state iteration time (median over peers of each peer's median step, first 10
    steps left out), in seconds.

    Args:
        n: peers (a power of two for the graph to be the one-peer exponential one).
        steps: steps every peer completes.
        transfer: seconds one model takes alone on an uplink.
        compute: fixed seconds of compute per step.
        jitter: extra compute per step, uniform in ``[0, jitter]``.
        skew: start times uniform in ``[0, skew]``.
        share: ``"even"`` (processor sharing) or ``"oldest"`` (oldest step first).
        seed: random seed.

    Returns:
        The iteration time.
    """
    if share not in ("even", "oldest"):
        raise ValueError(f"share must be 'even' or 'oldest', got {share!r}")
    if steps < 12:
        raise ValueError(f"need at least 12 steps, got {steps}")
    rng = random.Random(seed)
    published = {p: [rng.uniform(0.0, skew)] for p in range(n)}  # publish time of each step
    waiting = [(p, 0) for p in range(n)]  # (puller, step) whose transfer has not started
    active: list[_Transfer] = []
    now = 0.0
    while min(len(times) for times in published.values()) <= steps:
        still = []
        for puller, step in waiting:
            sender = source(puller, step, n)
            ready = published[puller][step] <= now + _EPSILON and (
                len(published[sender]) > step and published[sender][step] <= now + _EPSILON
            )
            if ready:
                active.append(_Transfer(sender, puller, step, now, 1.0))
            else:
                still.append((puller, step))
        waiting = still
        rates = _rates(active, transfer, share)
        ends = [t.remaining / r for t, r in zip(active, rates, strict=True) if r > 0]
        future = [times[-1] - now for times in published.values() if times[-1] > now + _EPSILON]
        dt = min(ends + future)
        now += dt
        finished = []
        for t, r in zip(active, rates, strict=True):
            t.remaining -= r * dt
            if t.remaining <= 1e-9:
                finished.append(t)
        for t in finished:
            active.remove(t)
            published[t.puller].append(now + compute + rng.uniform(0.0, jitter))
            waiting.append((t.puller, t.step + 1))
    steady = [itertools.pairwise(times[10 : steps + 1]) for times in published.values()]
    return statistics.median(statistics.median(b - a for a, b in pairs) for pairs in steady)


def _rates(active: list[_Transfer], transfer: float, share: str) -> list[float]:
    """Models per second each active transfer gets from its sender's uplink."""
    by_sender: dict[int, list[_Transfer]] = {}
    for t in active:
        by_sender.setdefault(t.sender, []).append(t)
    rate: dict[int, float] = {}
    for group in by_sender.values():
        if share == "even":
            for t in group:
                rate[id(t)] = 1.0 / transfer / len(group)
        else:
            first = min(group, key=lambda t: (t.step, t.started))
            for t in group:
                rate[id(t)] = 1.0 / transfer if t is first else 0.0
    return [rate[id(t)] for t in active]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="2,4,8")
    parser.add_argument("--transfer-ms", type=float, default=405.0)
    parser.add_argument("--compute-ms", type=float, default=10.0)
    parser.add_argument("--jitter-ms", type=float, default=10.0)
    parser.add_argument("--skew-ms", type=float, default=2000.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks/results/uplink_model.json"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    print(f"{'n':>3} {'share':<7} {'iteration ms':>12} {'x (transfer + compute)':>22}")
    for n in (int(x) for x in args.nodes.split(",")):
        for share in ("even", "oldest"):
            seconds = simulate(
                n, steps=args.steps, transfer=args.transfer_ms / 1e3,
                compute=args.compute_ms / 1e3, jitter=args.jitter_ms / 1e3,
                skew=args.skew_ms / 1e3, share=share,
            )  # fmt: skip
            ratio = seconds / ((args.transfer_ms + args.compute_ms) / 1e3)
            rows.append({"nodes": n, "share": share, "iteration_ms": 1e3 * seconds,
                         "ratio": ratio})  # fmt: skip
            print(f"{n:>3} {share:<7} {1e3 * seconds:12.1f} {ratio:22.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
