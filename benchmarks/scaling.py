"""Iteration time vs cluster size on network-namespace hosts with rate-capped links.

One peer per namespace host (``tests/netns.py``), every host's link capped both ways with
``tc tbf`` (25 and 100 Mbit/s by default), n = 2, 4, 8. Methods: DecentLaM over gRPC on the
one-peer exponential graph (raw float32, and with the lossless chunk codec,
``exchange.wire_codec: top-byte-huffman``) and on the ring, and PmSGD (gloo ring all-reduce);
opt-in with ``--methods``: asynchronous pipelined DecentLaM on the one-peer exponential graph,
that graph with a bfloat16 wire (``exchange.wire_dtype``), and the ring with the codec. The model
is the digits MLP with two wide hidden layers (``--hidden 512``: 300 k parameters, 1.2 MB in
float32) so that compute per step is a few milliseconds and the links, not the CPU, set the pace.

Measured per run: the steady-state iteration time (median over peers of each peer's median
step; the mean, which includes the first step's wait for the other peers, is in the JSON), and the
bytes each host's interface sent and received per iteration (``/proc/net/dev`` inside the
namespace, start-up included, divided by the steps), next to the model size. Needs root.

    python benchmarks/scaling.py [--nodes 2,4,8] [--rates 25mbit,100mbit] [--steps 30]
        [--hidden 512] [--methods ...] [--congestion-control cubic] [--trace]
        [--out benchmarks/results/scaling.json]
        [--plot ...png]

``--trace`` records both ends of every gRPC transfer (``decentlam peer --trace-exchanges``) and
adds to each row how many transfers shared their sender's uplink with another one and the
median time of those and of the others (``peer/transport/grpc/trace.py``).

Prints a table, writes JSON and a matplotlib PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from peer.transport.grpc.trace import load_trace, transfer_summary  # noqa: E402
from tests.netns import NetnsHosts, netns_unavailable  # noqa: E402
from topology.manifest import init_manifest  # noqa: E402

# (algorithm, graph, momentum, extra ``decentlam peer`` flags, ``exchange`` settings). DecentLaM
# with momentum 0.9 diverges on the time-varying one-peer exponential graph (the manifest refuses
# it: topology.spectral.momentum_consensus_growth; 8 peers are stable up to 0.70), so those rows
# run momentum 0.5; the communication, which is what this benchmark times, does not depend on it.
METHODS: dict[str, tuple[str, str, float, tuple[str, ...], dict[str, Any]]] = {
    "decentlam one-peer-exp": ("decentlam", "one-peer-exponential", 0.5, (), {}),
    "decentlam ring": ("decentlam", "ring", 0.9, (), {}),
    "pmsgd all-reduce": ("pmsgd", "ring", 0.9, (), {}),
    # Opt-in (--methods): asynchronous DecentLaM mixing the neighbours' previous-step vectors,
    # so each exchange has a whole step of slack. It tells whether the synchronous wait on the
    # slowest transfer is what costs time at n >= 4 (measured: only at n = 4; README).
    "decentlam one-peer-exp T=1 pipelined": (
        "decentlam", "one-peer-exponential", 0.5, ("--max-staleness", "1", "--pipeline"), {}
    ),
    # Opt-in: the same exchange with the vectors on the wire in bfloat16 (half the bytes, a
    # rounding error per mixing step; PmSGD's gloo all-reduce stays float32).
    "decentlam one-peer-exp bf16 wire": (
        "decentlam", "one-peer-exponential", 0.5, (), {"wire_dtype": "bfloat16"}
    ),
    # Opt-in: the float32 exchange coded losslessly (exchange.wire_codec: the sign-and-exponent
    # byte of every element Huffman-coded; bit-exact, about 0.83 of the bytes).
    "decentlam one-peer-exp lossless": (
        "decentlam", "one-peer-exponential", 0.5, (), {"wire_codec": "top-byte-huffman"}
    ),
    "decentlam ring lossless": ("decentlam", "ring", 0.9, (), {"wire_codec": "top-byte-huffman"}),
}  # fmt: skip
#: The methods run when ``--methods`` is not given.
DEFAULT_METHODS = (
    "decentlam one-peer-exp",
    "decentlam one-peer-exp lossless",
    "decentlam ring",
    "pmsgd all-reduce",
)


def interface_bytes(hosts: NetnsHosts, host: int) -> tuple[int, int]:
    """(received, sent) bytes of ``host``'s eth0 so far."""
    text = hosts.run(host, ["cat", "/proc/net/dev"], timeout=30).stdout
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "eth0":
            fields = rest.split()
            return int(fields[0]), int(fields[8])
    raise RuntimeError(f"no eth0 in host {host}")


def run_once(
    hosts: NetnsHosts, method: str, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One cluster of ``hosts.n`` peers; returns the measurements."""
    algorithm, graph, momentum, peer_flags, exchange = METHODS[method]
    n = hosts.n
    manifest = init_manifest(
        n, graph, hosts=[hosts.address(h) for h in range(n)], peers_per_host=1,
        algorithm=algorithm, task="digits", steps=args.steps, lr=0.05, momentum=momentum, seed=0,
        task_options={"hidden": args.hidden, "batch_size": 32, "alpha": None},
    )  # fmt: skip
    data = manifest.to_dict()
    # Eight torch processes starting at once on a loaded machine can take a minute or more.
    data["exchange"].update(fetch_deadline_seconds=120.0, connect_deadline_seconds=240.0)
    data["exchange"].update(exchange)
    out = work / f"{method.replace(' ', '-')}-{n}"
    out.mkdir(parents=True)
    path = out / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith("SOCKET_IFNAME")},
        "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "DECENTLAM_TORCH_THREADS": "1",
    }  # fmt: skip
    before = [interface_bytes(hosts, h) for h in range(n)]
    processes = []
    for rank in range(n):
        with open(out / f"rank-{rank}.log", "wb") as log:
            argv = [sys.executable, "-m", "launcher.cli", "peer", "--manifest", str(path),
                    "--out", str(out), "--quiet", "--linger-seconds", "30",
                    *peer_flags]  # fmt: skip
            if args.trace:
                argv += ["--trace-exchanges", str(out / "trace")]
            processes.append(hosts.popen(rank, argv, log=log, env=env))
    deadline = time.monotonic() + args.timeout
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline:
            for process in processes:  # free the ports for the next run on these hosts
                process.kill()
            raise RuntimeError(f"{method} n={n}: not finished in {args.timeout} s (logs {out})")
        time.sleep(0.5)
    codes = [p.returncode for p in processes]
    if any(codes):
        raise RuntimeError(f"{method} n={n}: exit codes {codes} (logs in {out})")
    after = [interface_bytes(hosts, h) for h in range(n)]
    results = [json.loads((out / f"peer-{r}.json").read_text()) for r in range(n)]
    model_bytes = 4 * (64 * args.hidden + args.hidden + args.hidden**2 + args.hidden
                       + 10 * args.hidden + 10)  # fmt: skip
    row: dict[str, Any] = {
        "method": method,
        "nodes": n,
        # Steady state: the median over peers of each peer's median step (a peer's first step
        # also waits for its neighbours to start, which skews the mean of a short run).
        "iteration_ms": 1000 * statistics.median(r["median_iteration_seconds"] for r in results),
        "blocked_ms": 1000 * statistics.median(r["median_blocked_seconds"] for r in results),
        "mean_iteration_ms": 1000 * statistics.median(r["mean_iteration_seconds"] for r in results),
        "sent_bytes_per_iteration": statistics.mean(
            (a[1] - b[1]) / args.steps for a, b in zip(after, before, strict=True)
        ),
        "received_bytes_per_iteration": statistics.mean(
            (a[0] - b[0]) / args.steps for a, b in zip(after, before, strict=True)
        ),
        "model_bytes": model_bytes,
        "accuracy": statistics.mean(r["eval"].get("accuracy", float("nan")) for r in results),
    }
    if args.trace and algorithm != "pmsgd":  # gloo's all-reduce is not traced
        row["transfers"] = transfer_summary(load_trace(sorted((out / "trace").glob("*.jsonl"))))
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Iteration time vs n, one panel per link rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in rows}, key=lambda r: int(r.rstrip("mbit")))
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for axis, rate in zip(axes[0], rates, strict=True):
        for method in METHODS:
            points = sorted((r["nodes"], r["iteration_ms"]) for r in rows
                            if r["rate"] == rate and r["method"] == method)  # fmt: skip
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
        axis.set_title(f"links capped at {rate}")
        axis.set_xlabel("peers (one per namespace host)")
        axis.set_ylabel("iteration time (ms)")
        axis.set_xticks(sorted({r["nodes"] for r in rows}))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="2,4,8")
    parser.add_argument("--rates", default="25mbit,100mbit")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of: {list(METHODS)}"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace every gRPC transfer (decentlam peer --trace-exchanges) and report how many "
        "shared their sender's uplink and how long those and the others took",
    )
    parser.add_argument(
        "--congestion-control",
        default="cubic",
        help="every host's TCP congestion control (default cubic, Linux's default; BBR v1 flows "
        "sharing a capped drop-tail link lose ~20%% of it, README)",
    )
    parser.add_argument("--work", type=Path, help="keep run directories (logs) here")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/scaling.json")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "benchmarks/results/scaling.png")
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        print(f"scaling.py: {reason}", file=sys.stderr)
        return 2
    # A SIGTERM must still run the ``finally`` that deletes the namespaces.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    rows: list[dict[str, Any]] = []
    work = args.work or Path(tempfile.mkdtemp(prefix="decentlam-scaling-"))
    print(f"run directories (logs) in {work}", flush=True)
    for rate in args.rates.split(","):
        for n in (int(x) for x in args.nodes.split(",")):
            hosts = NetnsHosts(n, congestion_control=args.congestion_control).up()
            try:
                for h in range(n):
                    hosts.cap(h, rate)
                for method in methods:
                    try:
                        row = {"rate": rate, **run_once(hosts, method, args, work / rate)}
                    except RuntimeError as exc:  # keep going; the row says what failed
                        print(f"{rate:>8} n={n} {method:<24} FAILED: {exc}", flush=True)
                        continue
                    rows.append(row)
                    print(f"{rate:>8} n={n} {method:<24} {row['iteration_ms']:8.1f} ms "
                          f"sent {row['sent_bytes_per_iteration'] / 1e6:6.2f} MB/it",
                          flush=True)  # fmt: skip
                    if "transfers" in row:
                        t = row["transfers"]
                        print(f"{'':>8}   transfers {t['transfers']}, {t['shared']} shared the "
                              f"sender's uplink: alone {1e3 * t['alone_median_seconds']:.0f} ms, "
                              f"shared {1e3 * t['shared_median_seconds']:.0f} ms, "
                              f"wait for the sender {1e3 * t['wait_median_seconds']:.0f} ms "
                              f"(medians)", flush=True)  # fmt: skip
            finally:
                hosts.down()
    print()
    print(f"{'rate':>8} {'n':>2} {'method':<24} {'iter ms':>8} {'blocked ms':>10} "
          f"{'sent MB/it':>10} {'recv MB/it':>10} {'x pmsgd':>7}")  # fmt: skip
    for row in rows:
        base = [r for r in rows if r["rate"] == row["rate"] and r["nodes"] == row["nodes"]
                and r["method"] == "pmsgd all-reduce"]  # fmt: skip
        ratio = row["iteration_ms"] / base[0]["iteration_ms"] if base else float("nan")
        print(f"{row['rate']:>8} {row['nodes']:>2} {row['method']:<24} "
              f"{row['iteration_ms']:8.1f} {row['blocked_ms']:10.1f} "
              f"{row['sent_bytes_per_iteration'] / 1e6:10.2f} "
              f"{row['received_bytes_per_iteration'] / 1e6:10.2f} {ratio:7.2f}")  # fmt: skip
    model = rows[0]["model_bytes"] if rows else 0
    print(f"model: digits MLP hidden {args.hidden}, {model / 1e6:.2f} MB float32; "
          f"{args.steps} steps per run")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=2))  # fmt: skip
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
