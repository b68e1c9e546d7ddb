"""Iteration time with exchanges blocking, overlapped with backward, or pipelined (T = 1).

Runs 2-peer clusters (real processes, loopback gRPC): ``--blocking`` (each step computes, then
exchanges), overlapped (each bucket's exchange starts from a gradient hook during backward and
must finish before the update) and pipelined (asynchronous DecentLaM with
``--max-staleness 1 --pipeline``: step k mixes the neighbours' step k-1 vectors, so each exchange
runs during the whole next step). The link is made slow with the exchange engine's bandwidth cap
so that communication costs about as much as compute; a blocking run measures both:
``comm = blocked time``, ``compute = iteration - blocked``. Targets: overlapped iteration
<= 1.15 x max(compute, comm); pipelined <= 1.05 x max(compute, comm).

The buckets are set apart for the pipeline (``--pipeline-bucket-bytes``; 4 MiB, the manifest
default), with a blocking run of its own for its bound. Overlap needs small buckets
(``--bucket-bytes``, 64 KiB) so that exchanges start while backward still runs. For the
pipeline, each extra bucket is one more fetch per step, paid in compute time (~20 ms per step at
64 KiB here). Starting early still helps it when communication dominates. Measured on
2026-12-02 with the oldest-first limiter (medians of repeats): comm-bound (4 MB/s) the pipeline
took 1.013x max(compute, comm), with comm ~ compute (20 MB/s) 1.03-1.10x (the event loop's CPU
per exchange comes out of compute when the two peers' training fills both cores).

Times are means over every step after ``--warmup-steps`` of each run, both peers (medians
mislead here: pipelined step times are bimodal), from the per-step times in ``peer-<r>.json``.
The warm-up steps hold start-up and, for the pipeline, a first step that also waits for its own
exchange.

    python benchmarks/overlap.py [--steps 120] [--warmup-steps 10] [--repeats 1] [--bandwidth 4e6]
        [--bucket-bytes 65536] [--pipeline-bucket-bytes 4194304] [--offloaded-compute-ms 0]
        [--pipeline-only] [--blocking-receive]

Prints a table and writes JSON (``--out``, default ``benchmarks/results/overlap.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

from launcher.cluster import LocalCluster, on_free_ports
from topology.manifest import dump_manifest, init_manifest


def write_manifest(path: Path, args: argparse.Namespace, bucket_bytes: int) -> Path:
    """A 2-peer loopback manifest: ResNet-20-sized CNN on synthetic images, capped links."""
    options = {"batch_size": args.batch_size, "width": args.width}
    if args.offloaded_compute_ms > 0:
        # Every peer sleeps inside its compute: time a GPU kernel would take, CPU left free.
        options |= {"step_delay_seconds": args.offloaded_compute_ms / 1e3, "slow_ranks": [0, 1]}
    manifest = init_manifest(
        2, "ring", algorithm="decentlam", task="synthetic-image", task_options=options,
        steps=args.steps, lr=0.01, momentum=0.9, seed=0,
    )  # fmt: skip
    manifest = on_free_ports(manifest)
    exchange = dataclasses.replace(
        manifest.exchange,
        bandwidth_bytes_per_second=int(args.bandwidth),
        bucket_bytes=bucket_bytes,
        blocking_receive=args.blocking_receive,
    )
    path.write_text(dump_manifest(dataclasses.replace(manifest, exchange=exchange)))
    return path


def run(
    manifest: Path,
    out: Path,
    blocking: bool,
    warmup: int,
    pipeline: bool = False,
    offloaded_seconds: float = 0.0,
) -> dict[str, float]:
    """Run the cluster once; per-step times from the peers' results, warm-up steps dropped."""
    args = ["--linger-seconds", "30"] + (["--blocking"] if blocking else [])
    if pipeline:
        args += ["--max-staleness", "1", "--pipeline"]
    cluster = LocalCluster(manifest, out, args)
    cluster.start()
    try:
        if not cluster.wait(600):
            raise RuntimeError(f"cluster did not finish; logs in {out / 'logs'}")
    finally:
        cluster.stop(grace_seconds=5)
    iterations: list[float] = []
    blocked: list[float] = []
    process_cpu: list[float] = []
    training_cpu: list[float] = []
    queued: list[float] = []
    for rank in (0, 1):
        result = json.loads((out / f"peer-{rank}.json").read_text())
        steps = len(result["step_seconds"])
        if steps <= warmup:
            raise RuntimeError(f"peer {rank} ran {steps} steps, not more than {warmup} warm-up")
        iterations += result["step_seconds"][warmup:]
        blocked += result["step_blocked_seconds"][warmup:]
        process_cpu += result["step_cpu_seconds"][warmup:]
        training_cpu += result["step_training_cpu_seconds"][warmup:]
        queued += result.get("step_training_runqueue_seconds", [])[warmup:]
    mean_iteration, mean_blocked = statistics.mean(iterations), statistics.mean(blocked)
    return {
        "iteration_seconds": mean_iteration,
        "blocked_seconds": mean_blocked,
        "compute_seconds": mean_iteration - mean_blocked,
        "warmup_steps": warmup,
        # CPU per step: the training thread's, and the rest of the process's (the exchange's
        # event loop and grpc threads) during the same steps.
        "training_cpu_seconds": statistics.mean(training_cpu),
        "exchange_cpu_seconds": statistics.mean(process_cpu) - statistics.mean(training_cpu),
        # Wall time of the compute that the training thread spent neither on a CPU nor asleep
        # in the offloaded compute: waiting for a core (the run-queue part) or for the GIL.
        "training_waiting_seconds": mean_iteration
        - mean_blocked
        - statistics.mean(training_cpu)
        - offloaded_seconds,
        "training_runqueue_seconds": statistics.mean(queued) if queued else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=10,
        help="first steps of every run left out of the means (start-up, the pipeline filling)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="run the four clusters N times")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="ResNet-20 width (16 = 0.27 M)")
    parser.add_argument("--bandwidth", type=float, default=4e6, help="link cap in bytes/s")
    parser.add_argument("--bucket-bytes", type=int, default=64 * 1024)
    parser.add_argument("--pipeline-bucket-bytes", type=int, default=4 << 20)
    parser.add_argument(
        "--offloaded-compute-ms",
        type=float,
        default=0.0,
        help="every peer also sleeps this long inside each step's compute: compute that leaves "
        "this machine's CPU free, as an accelerator's kernels do (0: CPU compute only)",
    )
    parser.add_argument(
        "--pipeline-only",
        action="store_true",
        help="skip the small-bucket blocking and overlapped runs",
    )
    parser.add_argument(
        "--blocking-receive",
        action="store_true",
        help="exchange.blocking_receive: read streams in worker threads, not on the event loop",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overlap.json"))
    args = parser.parse_args(argv)
    repeats: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="decentlam-overlap-") as tmp:
        small = write_manifest(Path(tmp) / "m.yaml", args, args.bucket_bytes)
        large = write_manifest(Path(tmp) / "m-large.yaml", args, args.pipeline_bucket_bytes)
        started = time.perf_counter()
        for index in range(args.repeats):
            # Each repeat runs the four clusters back to back, so a ratio compares runs made
            # seconds apart (this machine's speed drifts by more than the effects measured).
            out = Path(tmp) / f"repeat-{index}"
            warmup = args.warmup_steps
            result = {}
            sleep = args.offloaded_compute_ms / 1e3
            if not args.pipeline_only:
                result["blocking"] = run(small, out / "blocking", True, warmup, False, sleep)
                result["overlapped"] = run(small, out / "overlapped", False, warmup, False, sleep)
            large_out = out / "blocking-large"
            result["blocking_large"] = run(large, large_out, True, warmup, False, sleep)
            result["pipelined"] = run(large, out / "pipelined", False, warmup, True, sleep)
            repeats.append(result)
        elapsed = time.perf_counter() - started
    for result in repeats:
        large_run = result["blocking_large"]
        bound_large = max(large_run["compute_seconds"], large_run["blocked_seconds"])
        result["ratios"] = {
            "pipelined_over_max": result["pipelined"]["iteration_seconds"] / bound_large,
        }
        if "blocking" in result:
            blocking = result["blocking"]
            bound = max(blocking["compute_seconds"], blocking["blocked_seconds"])
            result["ratios"]["overlapped_over_max"] = (
                result["overlapped"]["iteration_seconds"] / bound
            )

    def median(run_name: str, key: str) -> float | None:
        if run_name not in repeats[0]:
            return None
        return statistics.median(r[run_name][key] for r in repeats)

    def larger(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else max(a, b)

    compute, comm = median("blocking", "compute_seconds"), median("blocking", "blocked_seconds")
    compute_large = median("blocking_large", "compute_seconds")
    comm_large = median("blocking_large", "blocked_seconds")
    offloaded = (
        f", plus {args.offloaded_compute_ms:g} ms of offloaded (CPU-free) compute per step"
        if args.offloaded_compute_ms > 0
        else ""
    )
    print(f"2 peers, synthetic-image ResNet-20 (width {args.width}), batch {args.batch_size}"
          f"{offloaded}, link cap {args.bandwidth / 1e6:.1f} MB/s, {args.steps} steps "
          f"({args.warmup_steps} warm-up), means; medians of {args.repeats} repeat(s)")  # fmt: skip
    print(f"{'':<46} {f'{args.bucket_bytes} B':>12} {f'{args.pipeline_bucket_bytes} B':>12}")
    for label, small_value, large_value in (
        ("compute (blocking run: iteration - blocked)", compute, compute_large),
        ("comm (blocking run: blocked)", comm, comm_large),
        ("max(compute, comm)", larger(compute, comm), larger(compute_large, comm_large)),
        (
            "blocking iteration",
            median("blocking", "iteration_seconds"),
            median("blocking_large", "iteration_seconds"),
        ),
        ("overlapped iteration", median("overlapped", "iteration_seconds"), None),
        ("pipelined iteration (T = 1)", None, median("pipelined", "iteration_seconds")),
        ("pipelined blocked", None, median("pipelined", "blocked_seconds")),
        (
            "training thread CPU per step (blocking run)",
            median("blocking", "training_cpu_seconds"),
            median("blocking_large", "training_cpu_seconds"),
        ),
        (
            "exchange CPU per step (blocking run)",
            median("blocking", "exchange_cpu_seconds"),
            median("blocking_large", "exchange_cpu_seconds"),
        ),
        (
            "training thread CPU per step (overlap/pipeline)",
            median("overlapped", "training_cpu_seconds"),
            median("pipelined", "training_cpu_seconds"),
        ),
        (
            "exchange CPU per step (overlapped/pipelined)",
            median("overlapped", "exchange_cpu_seconds"),
            median("pipelined", "exchange_cpu_seconds"),
        ),
        (
            "training thread waiting (blocking run)",
            median("blocking", "training_waiting_seconds"),
            median("blocking_large", "training_waiting_seconds"),
        ),
        (
            "training thread waiting (overlap/pipeline)",
            median("overlapped", "training_waiting_seconds"),
            median("pipelined", "training_waiting_seconds"),
        ),
        (
            "  of which waiting for a core (blocking run)",
            median("blocking", "training_runqueue_seconds"),
            median("blocking_large", "training_runqueue_seconds"),
        ),
        (
            "  of which waiting for a core (overlap/pipeline)",
            median("overlapped", "training_runqueue_seconds"),
            median("pipelined", "training_runqueue_seconds"),
        ),
    ):
        cells = [f"{v * 1e3:9.1f} ms" if v is not None else f"{'':>12}"
                 for v in (small_value, large_value)]  # fmt: skip
        print(f"{label:<46} {cells[0]:>12} {cells[1]:>12}")
    ratio = median("ratios", "overlapped_over_max") if compute is not None else None
    pipelined_ratio = statistics.median(r["ratios"]["pipelined_over_max"] for r in repeats)
    each = ", ".join(f"{r['ratios']['pipelined_over_max']:.3f}" for r in repeats)
    if ratio is not None:
        print(f"{'overlapped / max(compute, comm)':<46} {ratio:9.2f}x   (target <= 1.15x)")
    print(f"{'pipelined / max(compute, comm)':<46} {pipelined_ratio:9.3f}x   (target <= 1.05x;"
          f" each repeat: {each})")  # fmt: skip
    report = {
        "config": vars(args) | {"out": str(args.out)},
        "overlapped_over_max": ratio,
        "pipelined_over_max": pipelined_ratio,
        "compute_seconds": compute,
        "comm_seconds": comm,
        "pipeline_compute_seconds": compute_large,
        "pipeline_comm_seconds": comm_large,
        "repeats": repeats,
        "wall_seconds": elapsed,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
