"""Benchmark of the gRPC exchange against torch.distributed gloo and raw TCP (one run, loopback).

For each vector size (default 1, 10, 100 MB of float32) it measures, as medians over
``--repeats`` timed runs after ``--warmup`` untimed ones:

* gRPC fetch (``GrpcCommunicator.fetch``) from a server living in a separate process (no shared
  GIL), for every combination of ``--chunk-mib`` and ``--parallel-streams``;
* gloo ``send``/``recv`` of the same tensor between two processes;
* raw TCP ``sendall``/``recv_into`` between two processes (the physical limit here);
* the bandwidth limiter: its overhead at an unreachable cap (vs. no limiter) and the rate it
  achieves under ``--cap-mb-per-s``.

Prints a table (GB/s and gRPC/gloo ratio), writes JSON (``--out``) and reports peak RSS.

Usage::

    python benchmarks/exchange.py [--sizes-mb 1 10 100] [--repeats 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import socket
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum

logger = logging.getLogger(__name__)

MB = 1_000_000
MIB = 1 << 20


def _vector(size_mb: float) -> torch.Tensor:
    return torch.randn(int(size_mb * MB) // 4)


def _grpc_server(conn: Any, sizes_mb: list[float], cap_bytes_per_s: float) -> None:
    """Child process: serve every size unlimited, 100 MB at an unreachable cap, 10 and 40 MB
    capped."""
    torch.set_num_threads(1)
    variants = {
        "unlimited": (None, sizes_mb),
        "huge_cap": (1e13, [max(sizes_mb)]),
        "capped": (cap_bytes_per_s, [10.0, 40.0]),
    }
    comms, alive = {}, []  # keep the communicators referenced: their servers stop when collected
    for label, (cap, sizes) in variants.items():
        config = ExchangeConfig(chunk_bytes=16 * MIB, bandwidth_bytes_per_second=cap)
        comm = GrpcCommunicator.start(1, {}, world_size=2, config=config)
        for size in sizes:
            comm.publish(f"v{size}", _vector(size), 0)
        comms[label] = comm.address
        alive.append(comm)
    conn.send(comms)
    conn.recv()  # wait for "stop"
    # the communicators die with the process; closing is not needed for a benchmark child


def _median_seconds(fn: Any, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_grpc(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_grpc_server, args=(child, args.sizes_mb, args.cap_mb_per_s * MB))
    server.start()
    try:
        addresses = parent.recv()
        results: dict[str, Any] = {"fetch": {}, "throttle": {}}
        for chunk_mib in args.chunk_mib:
            for streams in args.parallel_streams:
                config = ExchangeConfig(chunk_bytes=int(chunk_mib * MIB), parallel_streams=streams)
                client = GrpcCommunicator.start(0, {1: addresses["unlimited"]}, config=config)
                key = f"chunk={chunk_mib}MiB,streams={streams}"
                for size in args.sizes_mb:
                    like = torch.empty(int(size * MB) // 4)
                    seconds = _median_seconds(
                        lambda c=client, s=size, t=like: c.fetch(1, f"v{s}", 0, like=t),
                        args.repeats,
                        args.warmup,
                    )
                    results["fetch"].setdefault(str(size), {})[key] = seconds
                client.close()
        best = ExchangeConfig(parallel_streams=max(args.parallel_streams))
        size = max(args.sizes_mb)
        like = torch.empty(int(size * MB) // 4)
        for label in ("unlimited", "huge_cap"):
            client = GrpcCommunicator.start(0, {1: addresses[label]}, config=best)
            results["throttle"][label] = _median_seconds(
                lambda c=client: c.fetch(1, f"v{size}", 0, like=like), args.repeats, args.warmup
            )
            client.close()
        client = GrpcCommunicator.start(0, {1: addresses["capped"]}, config=best)
        # Steady-state rate from the difference of two transfers: the limiter's burst allowance
        # (one 0.1 s window) and fixed per-fetch costs cancel out.
        seconds = {}
        for mb in (10.0, 40.0):
            like_mb = torch.empty(int(mb * MB) // 4)
            seconds[mb] = _median_seconds(
                lambda m=mb, t=like_mb: client.fetch(1, f"v{m}", 0, like=t), 3, 1
            )
        client.close()
        results["throttle"]["cap_bytes_per_s"] = args.cap_mb_per_s * MB
        results["throttle"]["achieved_bytes_per_s"] = 30 * MB / (seconds[40.0] - seconds[10.0])
        parent.send("stop")
        return results
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.terminate()


def _gloo_worker(
    rank: int, init_file: str, sizes_mb: list[float], repeats: int, warmup: int, queue: Any
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    out = {}
    for size in sizes_mb:
        tensor = _vector(size) if rank == 1 else torch.empty(int(size * MB) // 4)
        samples = []
        for i in range(warmup + repeats):
            dist.barrier()
            started = time.perf_counter()
            if rank == 1:
                dist.send(tensor, dst=0)
            else:
                dist.recv(tensor, src=1)
            if i >= warmup:
                samples.append(time.perf_counter() - started)
        out[str(size)] = statistics.median(samples)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def bench_gloo(args: argparse.Namespace, ctx: Any) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "gloo-init")
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=_gloo_worker,
                args=(r, init_file, args.sizes_mb, args.repeats, args.warmup, queue),
            )
            for r in (0, 1)
        ]
        for proc in procs:
            proc.start()
        result = queue.get(timeout=300)
        for proc in procs:
            proc.join(timeout=30)
        return result


def _tcp_server(conn: Any, sizes_mb: list[float]) -> None:
    payloads = {str(s): memoryview(_vector(s).numpy()).cast("B") for s in sizes_mb}
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    with sock:
        while True:
            request = sock.recv(64)
            if not request or request == b"stop":
                return
            sock.sendall(payloads[request.decode()])


def bench_tcp(args: argparse.Namespace, ctx: Any) -> dict[str, float]:
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_tcp_server, args=(child, args.sizes_mb))
    server.start()
    port = parent.recv()
    out = {}
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for size in args.sizes_mb:
            buffer = memoryview(bytearray(int(size * MB) // 4 * 4))

            def one(s: float = size, buf: memoryview = buffer) -> None:
                sock.sendall(str(s).encode())
                got = 0
                while got < len(buf):
                    got += sock.recv_into(buf[got:])

            out[str(size)] = _median_seconds(one, args.repeats, args.warmup)
        sock.sendall(b"stop")
    server.join(timeout=30)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark, print the table and write the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-mib", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--parallel-streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cap-mb-per-s", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exchange.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ctx = mp.get_context("spawn")
    gloo = bench_gloo(args, ctx)
    tcp = bench_tcp(args, ctx)
    grpc_results = bench_grpc(args, ctx)
    rows = []
    print(f"{'size':>8} {'transport':<32} {'median ms':>10} {'GB/s':>7} {'x gloo':>7}")
    for size in args.sizes_mb:
        key = str(size)
        nbytes = int(size * MB) // 4 * 4
        entries = {"gloo send/recv": gloo[key], "raw TCP": tcp[key]}
        entries.update({f"gRPC {k}": v for k, v in grpc_results["fetch"][key].items()})
        for name, seconds in entries.items():
            row = {
                "size_mb": size,
                "transport": name,
                "median_seconds": seconds,
                "gb_per_s": nbytes / seconds / 1e9,
                "ratio_to_gloo": seconds / gloo[key],
            }
            rows.append(row)
            print(
                f"{size:>6g}MB {name:<32} {seconds * 1e3:>10.1f} {row['gb_per_s']:>7.2f} "
                f"{row['ratio_to_gloo']:>7.2f}"
            )
    payload = memoryview(_vector(max(args.sizes_mb)).numpy()).cast("B")
    target = memoryview(bytearray(len(payload)))
    crc_seconds = _median_seconds(lambda: zlib.crc32(payload), 5, 1)
    used_seconds = _median_seconds(lambda: checksum(DEFAULT_CHECKSUM, payload), 5, 1)
    copy_seconds = _median_seconds(lambda: target.__setitem__(slice(None), payload), 5, 1)
    print(
        f"per-{max(args.sizes_mb):g} MB costs: zlib crc32 {crc_seconds * 1e3:.1f} ms, "
        f"{DEFAULT_CHECKSUM} (used) {used_seconds * 1e3:.1f} ms, "
        f"memcpy {copy_seconds * 1e3:.1f} ms"
    )
    throttle = grpc_results["throttle"]
    overhead = throttle["huge_cap"] / throttle["unlimited"] - 1
    print(f"throttler overhead at an unreachable cap ({max(args.sizes_mb):g} MB): {overhead:+.1%}")
    print(
        f"capped rate: {throttle['achieved_bytes_per_s'] / MB:.1f} MB/s "
        f"(cap {throttle['cap_bytes_per_s'] / MB:.0f} MB/s)"
    )
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: client {peak_self:.0f} MiB, largest child {peak_children:.0f} MiB")
    report = {
        "rows": rows,
        "throttle": throttle,
        "throttle_overhead": overhead,
        "peak_rss_mib": {"client": peak_self, "largest_child": peak_children},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
