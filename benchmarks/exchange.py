"""Benchmark of the gRPC exchange against torch.distributed gloo and raw TCP (one run, loopback).

For each vector size (default 1, 10, 100 MB of float32) it measures, as medians over
``--repeats`` timed rounds after ``--warmup`` untimed ones:

* gRPC fetch (``GrpcCommunicator.fetch`` into a reused buffer, as gloo's ``recv``) from a
  server living in a separate process (no shared GIL), for every ``--wire-dtypes`` and every
  combination of ``--receivers`` (event loop or worker threads), ``--chunk-mib``,
  ``--parallel-streams`` (one TCP connection per stream) and ``--checksums`` (the receiver's
  CRC-32C on or off, ``exchange.verify_checksums``), plus one row per wire dtype with a
  fresh buffer per fetch (what a caller without ``out=`` pays);
* gloo ``send``/``recv`` of the same tensor between two processes;
* raw TCP ``sendall``/``recv_into`` between two processes (the physical limit here);
* the bandwidth limiter: its overhead at an unreachable cap (vs. no limiter) and the rate it
  achieves under ``--cap-mb-per-s`` (skipped with ``--skip-throttle``).

Every row's processes stay up for the whole run and the rounds are interleaved (each round
times one transfer of every row, in a rotating order), so load from other processes on a
shared machine hits every row alike and the ratios stay meaningful. Each side of every gRPC row
reports its peak RSS against its RSS before the vectors were allocated.

Each transfer's processes are also charged the CPU they spent during it, per thread group
(``benchmarks/_cpu.py``: receiver event loop and its workers, grpc C-core threads, sender):
half the sum of both sides is the least wall time the transfer can take when both share this
machine's 2 cores, which tells a CPU-bound row from one that waits.

Prints a table (GB/s of the float32 vector and the ratio to gloo) and the CPU table, writes JSON
(``--out``; each row's ``cpu_ms``).

Usage::

    python benchmarks/exchange.py [--sizes-mb 1 10 100] [--repeats 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import socket
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from _cpu import charged, snapshot

from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum
from peer.transport.grpc.wire import WIRE_DTYPES

logger = logging.getLogger(__name__)

MB = 1_000_000
MIB = 1 << 20
STOP = "stop"


def _vector(size_mb: float) -> torch.Tensor:
    return torch.randn(int(size_mb * MB) // 4)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_report(baseline_mib: float) -> dict[str, float]:
    return {"baseline_mib": baseline_mib, "peak_mib": _rss_mib()}


def _median_seconds(fn: Any, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# --- gRPC -------------------------------------------------------------------------------------


def _grpc_server(conn: Any, sizes_mb: list[float], wire_dtype: str) -> None:
    """Child process: serve one vector per size, rounded to ``wire_dtype`` once per version."""
    torch.set_num_threads(1)
    config = ExchangeConfig(chunk_bytes=16 * MIB, wire_dtype=wire_dtype)
    comm = GrpcCommunicator.start(1, {}, world_size=2, config=config)
    baseline = _rss_mib()
    for size in sizes_mb:
        comm.publish(f"v{size}", _vector(size), 0, copy=False)
    conn.send(comm.address)
    conn.recv()  # STOP
    conn.send(_rss_report(baseline))
    comm.close()


def _grpc_client(conn: Any, address: str, args: argparse.Namespace, wire_dtype: str) -> None:
    """Child process: one communicator per (chunk size, streams); times one fetch per command.

    Commands are ``(config_key, size_mb, fresh)``; the answer is the fetch's seconds.
    """
    torch.set_num_threads(1)
    baseline = _rss_mib()
    buffers = {size: torch.empty(int(size * MB) // 4) for size in args.sizes_mb}
    clients = {}
    for receiver in args.receivers:
        for chunk_mib in args.chunk_mib:
            for streams in args.parallel_streams:
                for checksums in args.checksums:
                    config = ExchangeConfig(
                        chunk_bytes=int(chunk_mib * MIB),
                        parallel_streams=streams,
                        channels_per_neighbor=streams,
                        wire_dtype=wire_dtype,
                        blocking_receive=receiver == "blocking",
                        verify_checksums=checksums == "on",
                    )
                    key = grpc_key(chunk_mib, streams, receiver, checksums)
                    clients[key] = GrpcCommunicator.start(0, {1: address}, config=config)
    conn.send(sorted(clients))
    while (command := conn.recv()) != STOP:
        key, size, fresh = command
        like = buffers[size]
        started = time.perf_counter()
        clients[key].fetch(1, f"v{size}", 0, like=like, out=None if fresh else like)
        conn.send(time.perf_counter() - started)
    for client in clients.values():
        client.close()
    conn.send(_rss_report(baseline))


def _rss_probe(conn: Any, address: str, sizes_mb: list[float], wire_dtype: str, n: int) -> None:
    """Child process: a peer-like reader (one default communicator) fetching ``n`` times per
    size into one reused buffer; reports its peak RSS (the interleaved clients hold many
    communicators, each with its own loop thread and malloc arena, so theirs is not a peer's)."""
    torch.set_num_threads(1)
    baseline = _rss_mib()
    client = GrpcCommunicator.start(0, {1: address}, config=ExchangeConfig(wire_dtype=wire_dtype))
    for size in sizes_mb:
        out = torch.empty(int(size * MB) // 4)
        for _ in range(n):
            client.fetch(1, f"v{size}", 0, like=out, out=out)
        del out
    client.close()
    conn.send(_rss_report(baseline))


def grpc_key(chunk_mib: float, streams: int, receiver: str, checksums: str = "on") -> str:
    """Row label of one gRPC configuration (each stream has a TCP connection of its own)."""
    crc = "" if checksums == "on" else " crc=off"
    return f"chunk={chunk_mib:g}MiB streams={streams} {receiver}{crc}"


# --- gloo -------------------------------------------------------------------------------------


def _gloo_worker(rank: int, init_file: str, sizes_mb: list[float], conn: Any) -> None:
    """Rank 0 receives on every command (a size, or STOP) and answers the seconds; rank 1 sends.

    Rank 0 tells rank 1 what comes next with a one-element tensor (0 = stop, else the index of
    the size), so the timed part is the 1-element command plus the transfer, as a barrier was.
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tensors = {
        s: _vector(s) if rank == 1 else torch.empty(int(s * MB) // 4) for s in sizes_mb
    }  # fmt: skip
    command = torch.zeros(1)
    if rank == 1:
        while True:
            dist.recv(command, src=0)
            if command.item() == 0:
                break
            dist.send(tensors[sizes_mb[int(command.item()) - 1]], dst=0)
    else:
        conn.send("ready")
        while (size := conn.recv()) != STOP:
            started = time.perf_counter()
            dist.send(torch.tensor([float(sizes_mb.index(size) + 1)]), dst=1)
            dist.recv(tensors[size], src=1)
            conn.send(time.perf_counter() - started)
        dist.send(torch.zeros(1), dst=1)
    dist.destroy_process_group()


# --- raw TCP ----------------------------------------------------------------------------------


def _tcp_server(conn: Any, sizes_mb: list[float]) -> None:
    payloads = {str(s): memoryview(_vector(s).numpy()).cast("B") for s in sizes_mb}
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    with sock:
        while True:
            request = sock.recv(64)
            if not request or request == STOP.encode():
                return
            sock.sendall(payloads[request.decode()])


def _tcp_client(conn: Any, port: int, sizes_mb: list[float]) -> None:
    buffers = {s: memoryview(bytearray(int(s * MB) // 4 * 4)) for s in sizes_mb}
    with socket.create_connection(("127.0.0.1", port)) as sock:
        conn.send("ready")
        while (size := conn.recv()) != STOP:
            buf = buffers[size]
            started = time.perf_counter()
            sock.sendall(str(size).encode())
            got = 0
            while got < len(buf):
                got += sock.recv_into(buf[got:])
            conn.send(time.perf_counter() - started)
        sock.sendall(STOP.encode())


# --- the interleaved run ----------------------------------------------------------------------


class Pool:
    """Every benchmark process of the run, and the control pipes of the timed sides."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.procs: list[Any] = []
        self._pids: dict[int, int] = {}

    def spawn(self, target: Any, *args: Any) -> Any:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(child, *args) if args else (child,))
        proc.start()
        self.procs.append(proc)
        self._pids[id(parent)] = proc.pid
        return parent

    def pid(self, pipe: Any) -> int:
        """The process at the other end of ``pipe`` (one that :meth:`spawn` returned)."""
        return self._pids[id(pipe)]

    def join(self) -> None:
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def run_interleaved(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """Start every row's processes, time interleaved rounds, stop them; medians and RSS."""
    pool = Pool(ctx)
    tmp = tempfile.TemporaryDirectory()
    try:
        init_file = str(Path(tmp.name) / "gloo-init")
        gloo = [pool.spawn(_gloo_worker_entry, rank, init_file, args.sizes_mb) for rank in (0, 1)]
        tcp_server = pool.spawn(_tcp_server, args.sizes_mb)
        tcp = pool.spawn(_tcp_client, tcp_server.recv(), args.sizes_mb)
        servers = {w: pool.spawn(_grpc_server, args.sizes_mb, w) for w in args.wire_dtypes}
        addresses = {w: pipe.recv() for w, pipe in servers.items()}
        clients = {w: pool.spawn(_grpc_client, addresses[w], args, w) for w in servers}
        gloo[0].recv()
        tcp.recv()
        keys_by_wire = {wire: pipe.recv() for wire, pipe in clients.items()}
        # Each row: size, label, control pipe, command, {pid: role} of the transfer's processes.
        rows: list[tuple[float, str, Any, Any, dict[int, str]]] = []

        def roles(receiver: Any, sender: Any) -> dict[int, str]:
            return {pool.pid(receiver): "receiver", pool.pid(sender): "sender"}

        for size in args.sizes_mb:
            rows.append((size, "gloo send/recv", gloo[0], size, roles(gloo[0], gloo[1])))
            rows.append((size, "raw TCP", tcp, size, roles(tcp, tcp_server)))
            for wire, pipe in clients.items():
                keys = keys_by_wire[wire]
                sides = roles(pipe, servers[wire])
                for key in keys:
                    rows.append((size, f"gRPC {wire} {key}", pipe, (key, size, False), sides))
                fresh = (keys[0], size, True)
                rows.append((size, f"gRPC {wire} {keys[0]} fresh buffer", pipe, fresh, sides))
        samples: dict[tuple[float, str], list[float]] = {(r[0], r[1]): [] for r in rows}
        cpu: dict[tuple[float, str], dict[str, float]] = {(r[0], r[1]): {} for r in rows}
        for round_index in range(args.warmup + args.repeats):
            shift = round_index % len(rows)
            for size, name, pipe, command, sides in rows[shift:] + rows[:shift]:
                before = snapshot(sides)
                pipe.send(command)
                seconds = pipe.recv()
                if round_index >= args.warmup:
                    samples[(size, name)].append(seconds)
                    spent = charged(before, snapshot(sides), sides)
                    totals = cpu[(size, name)]
                    for key, value in spent.items():
                        totals[key] = totals.get(key, 0.0) + value / args.repeats
        gloo[0].send(STOP)
        tcp.send(STOP)
        rss = {}
        for wire in clients:
            clients[wire].send(STOP)
            rss[f"{wire} benchmark client"] = clients[wire].recv()
            probe = pool.spawn(_rss_probe, addresses[wire], args.sizes_mb, wire, args.repeats)
            rss[f"{wire} peer-like client"] = probe.recv()
            servers[wire].send(STOP)
            rss[f"{wire} server"] = servers[wire].recv()
        return {"samples": samples, "cpu": cpu, "rss": rss}
    finally:
        pool.join()
        tmp.cleanup()


def _gloo_worker_entry(conn: Any, rank: int, init_file: str, sizes_mb: list[float]) -> None:
    _gloo_worker(rank, init_file, sizes_mb, conn)


# --- bandwidth limiter ------------------------------------------------------------------------


def _throttle_server(conn: Any, size_mb: float, cap_bytes_per_s: float) -> None:
    """Child process: ``size_mb`` with no cap and at an unreachable cap, 10 and 40 MB capped."""
    torch.set_num_threads(1)
    variants = {
        "unlimited": (None, [size_mb]),
        "huge_cap": (1e13, [size_mb]),
        "capped": (cap_bytes_per_s, [10.0, 40.0]),
    }
    addresses, alive = {}, []  # keep the communicators referenced: servers stop when collected
    for label, (cap, sizes) in variants.items():
        config = ExchangeConfig(chunk_bytes=16 * MIB, bandwidth_bytes_per_second=cap)
        comm = GrpcCommunicator.start(1, {}, world_size=2, config=config)
        for size in sizes:
            comm.publish(f"v{size}", _vector(size), 0)
        addresses[label] = comm.address
        alive.append(comm)
    conn.send(addresses)
    conn.recv()  # STOP


def bench_throttle(args: argparse.Namespace, ctx: Any) -> dict[str, float]:
    """Limiter overhead at an unreachable cap and the steady-state rate under a real cap."""
    pool = Pool(ctx)
    size = max(args.sizes_mb)
    server = pool.spawn(_throttle_server, size, args.cap_mb_per_s * MB)
    try:
        addresses = server.recv()
        like = torch.empty(int(size * MB) // 4)
        clients = {
            label: GrpcCommunicator.start(0, {1: addresses[label]}, config=ExchangeConfig())
            for label in ("unlimited", "huge_cap")
        }
        samples: dict[str, list[float]] = {label: [] for label in clients}
        for round_index in range(args.warmup + args.repeats):
            for label, client in clients.items():
                started = time.perf_counter()
                client.fetch(1, f"v{size}", 0, like=like, out=like)
                if round_index >= args.warmup:
                    samples[label].append(time.perf_counter() - started)
        for client in clients.values():
            client.close()
        results = {label: statistics.median(s) for label, s in samples.items()}
        client = GrpcCommunicator.start(0, {1: addresses["capped"]}, config=ExchangeConfig())
        # Steady-state rate from the difference of two transfers: the limiter's burst allowance
        # (one window) and fixed per-fetch costs cancel out.
        seconds = {}
        for mb in (10.0, 40.0):
            like_mb = torch.empty(int(mb * MB) // 4)
            seconds[mb] = _median_seconds(
                lambda m=mb, t=like_mb: client.fetch(1, f"v{m}", 0, like=t, out=t), 3, 1
            )
        client.close()
        results["cap_bytes_per_s"] = args.cap_mb_per_s * MB
        results["achieved_bytes_per_s"] = 30 * MB / (seconds[40.0] - seconds[10.0])
        server.send(STOP)
        return results
    finally:
        pool.join()


def print_cpu(rows: list[dict[str, Any]], cores: int) -> None:
    """CPU per transfer (means over the timed rounds) and the wall time it implies on ``cores``.

    ``both / cores`` is a lower bound on the transfer's wall time when the two sides share this
    machine's cores: a row whose median is near it is CPU-bound, not waiting on the network.
    """
    print(
        f"\nCPU per transfer, ms (receiver: event loop and its worker threads / gRPC C-core "
        f"threads / other Python; {cores} cores here)"
    )
    print(
        f"{'size':>8} {'transport':<46} {'receiver':>8} {'loop':>6} {'C-core':>6} {'other':>6} "
        f"{'sender':>7} {'both':>6} {f'/{cores}':>6} {'median':>7}"
    )
    for row in rows:
        cpu = row["cpu_ms"]
        both = cpu.get("receiver total", 0.0) + cpu.get("sender total", 0.0)
        print(
            f"{row['size_mb']:>6g}MB {row['transport']:<46} {cpu.get('receiver total', 0.0):>8.1f} "
            f"{cpu.get('receiver event loop', 0.0):>6.1f} "
            f"{cpu.get('receiver gRPC C-core', 0.0):>6.1f} "
            f"{cpu.get('receiver other Python', 0.0):>6.1f} {cpu.get('sender total', 0.0):>7.1f} "
            f"{both:>6.1f} {both / cores:>6.1f} {row['median_seconds'] * 1e3:>7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark, print the table and write the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-mib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--parallel-streams", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cap-mb-per-s", type=float, default=200.0)
    parser.add_argument(
        "--wire-dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(WIRE_DTYPES)
    )
    for flag, choices, text in (
        ("--receivers", ["aio", "blocking"],
         "client readers: the event loop (default) or worker threads (blocking_receive)"),
        ("--checksums", ["on", "off"],
         "receiver CRC-32C checks (exchange.verify_checksums); 'off' rows say crc=off"),
    ):  # fmt: skip
        parser.add_argument(flag, nargs="+", default=choices, choices=choices, help=text)
    parser.add_argument("--skip-throttle", action="store_true", help="skip the limiter runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exchange.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ctx = mp.get_context("spawn")
    measured = run_interleaved(args, ctx)
    rows = []
    print(f"{'size':>8} {'transport':<46} {'median ms':>10} {'GB/s':>7} {'x gloo':>7}")
    medians = {key: statistics.median(s) for key, s in measured["samples"].items()}
    for (size, name), seconds in medians.items():
        nbytes = int(size * MB) // 4 * 4  # float32 bytes: GB/s is of the vector, not the wire
        gloo = medians[(size, "gloo send/recv")]
        samples = measured["samples"][(size, name)]
        row = {
            "size_mb": size,
            "transport": name,
            "median_seconds": seconds,
            "min_seconds": min(samples),
            "max_seconds": max(samples),
            "gb_per_s": nbytes / seconds / 1e9,
            "ratio_to_gloo": seconds / gloo,
        }
        row["cpu_ms"] = {k: v * 1e3 for k, v in sorted(measured["cpu"][(size, name)].items())}
        rows.append(row)
        print(
            f"{size:>6g}MB {name:<46} {seconds * 1e3:>10.1f} {row['gb_per_s']:>7.2f} "
            f"{row['ratio_to_gloo']:>7.2f}"
        )
    print_cpu(rows, os.cpu_count() or 1)
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
    vectors_mib = max(args.sizes_mb) * MB / MIB
    rss: dict[str, Any] = {}
    for side, report in measured["rss"].items():
        growth = (report["peak_mib"] - report["baseline_mib"]) / vectors_mib
        rss[side] = {**report, "growth_x_largest_vector": growth}
        print(
            f"peak RSS gRPC {side}: {report['peak_mib']:.0f} MiB, "
            f"+{report['peak_mib'] - report['baseline_mib']:.0f} MiB over its start = "
            f"{growth:.2f}x the largest vector ({vectors_mib:.0f} MiB)"
        )
    report_json: dict[str, Any] = {
        "rows": rows,
        "peak_rss": rss,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if not args.skip_throttle:
        throttle = bench_throttle(args, ctx)
        overhead = throttle["huge_cap"] / throttle["unlimited"] - 1
        print(f"throttler overhead at an unreachable cap: {overhead:+.1%}")
        print(
            f"capped rate: {throttle['achieved_bytes_per_s'] / MB:.1f} MB/s "
            f"(cap {throttle['cap_bytes_per_s'] / MB:.0f} MB/s)"
        )
        report_json["throttle"] = throttle
        report_json["throttle_overhead"] = overhead
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report_json, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
