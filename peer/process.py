"""One peer process: manifest in, a trained model, checkpoints and a result file out.

``run_peer`` is what ``decentlam peer --manifest m.yaml --rank R`` runs:

1. load and validate the manifest, find this peer's entry (by rank, by host and port, or by
   matching the manifest's hosts against this machine's addresses and names);
2. start the metrics endpoint and the gRPC service (in a background thread);
3. wait, with a deadline, until every neighbour answers (the error names the missing ones);
4. build the task under the manifest's seed and check, by exchanging a digest, that every
   neighbour starts from identical parameters;
5. train with the manifest's algorithm (overlapped exchanges unless ``blocking``);
6. at the end: checkpoint, keep serving until the out-neighbours have fetched the last step
   (bounded by a deadline), stop everything it started, write ``peer-<r>.json``.

SIGTERM/SIGINT sets one stop event that every wait looks at: during steps 3 and 4 it ends the
wait with a :class:`PeerSetupError` naming the neighbours still missing; during training the
step in flight is abandoned whole, the checkpoint is written and the peer exits without
lingering.

A peer that finds its neighbours already training (it was restarted) waits for the ones that
answer only, skips 4 and rejoins instead: it takes a live neighbour's state through GetState
(:mod:`peer.rejoin`), unless its own checkpoint is at least as recent. While training, a
neighbour that fails is marked down and the others go on (live membership,
``exchange.failure_detection_seconds``, see :mod:`peer.transport.grpc.node`); faults are
injected from ``DECENTLAM_FAULTS`` (:mod:`peer.faults`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from peer import __version__
from peer.algorithms.rules import staleness_cost
from peer.errors import ExchangeError
from peer.faults import FaultInjector
from peer.rejoin import Rejoiner, StepBoundaryState, process_start_time
from peer.training.checkpoint import checkpoint_path, load_checkpoint
from peer.training.metrics import TrainingMetrics
from peer.training.optim import DecentralizedOptimizer
from peer.training.tasks import build_task
from peer.training.trainer import Trainer, TrainerConfig, TrainResult, flat_vector
from peer.transport.base import Communicator, Handle, TopologyLike, neighbors_over_period
from peer.transport.dist import RendezvousStopped

if TYPE_CHECKING:
    from peer.transport.grpc.communicator import GrpcCommunicator
    from peer.transport.grpc.wire import PeerInfo

logger = logging.getLogger(__name__)

DIGEST_VECTOR = "startup/param-digest"
# The digest wait looks at the stop request (SIGTERM) this often.
STARTUP_POLL_SECONDS = 0.5
# After a digest did not come: how long to probe the neighbours to tell dead from starting.
REACHABILITY_PROBE_SECONDS = 2.0
# Every vector name a peer publishes (optimizer buckets, consensus, start-up digest), with or
# without the global-average prefix: a Fetch of any other name is answered NOT_FOUND at once.
PEER_VECTOR_NAMES = (
    r"(global/)?params\d+\.\w+/\d+",
    r"(global/)?consensus/params",
    r"(global/)?startup/param-digest",
)


class PeerSetupError(RuntimeError):
    """The peer could not start (bad manifest entry, neighbours unreachable, different init)."""


class StartupStopped(PeerSetupError):
    """A stop request (SIGTERM, SIGINT) arrived while the peer was still starting up."""


@dataclass
class PeerOptions:
    """Command-line options of one peer (flags override the manifest).

    Attributes:
        manifest: path of the manifest.
        rank: this peer's rank; ``None`` finds it by ``host``/``port``, else by this
            machine's addresses and names.
        host, port: used to find the entry when ``rank`` is ``None`` (``port`` alone picks
            among several peers on this machine).
        local_index: with several peers on this machine, which one (0-based, rank order).
        out_dir: checkpoints, ``peer-<r>.json`` (default: ``./decentlam-out``).
        resume: continue from ``out_dir/rank-<r>.pt``.
        blocking: turn overlap off (exchanges start in ``step()`` and are waited at once).
        max_staleness: overrides the manifest's bound when not ``None``.
        pipeline: consume each exchange one step later (needs ``max_staleness = 1``; see
            :class:`peer.training.optim.DecentralizedOptimizer`).
        bind: address the gRPC server binds (default: the manifest host and port).
        dist_init_method: ``torch.distributed`` rendezvous for ``pmsgd``.
        linger_seconds: after the last step, how long to keep serving for slower neighbours.
        report: called with the operator's lines (one at start, then progress); ``None``:
            only logged.
        progress_seconds: how often a progress line is reported (0: never).
        trace_exchanges: append a per-transfer trace to ``trace_exchanges/exchanges-<r>.jsonl``
            (:mod:`peer.transport.grpc.trace`); None: no trace.
    """

    manifest: Path
    rank: int | None = None
    host: str | None = None
    port: int | None = None
    local_index: int | None = None
    out_dir: Path = Path("decentlam-out")
    resume: bool = False
    blocking: bool = False
    max_staleness: int | None = None
    pipeline: bool = False
    bind: str | None = None
    dist_init_method: str | None = None
    linger_seconds: float = 60.0
    report: Callable[[str], None] | None = None
    progress_seconds: float = 10.0
    trace_exchanges: Path | None = None


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; other strings as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PeerSetupError(f"device {spec!r} requested but CUDA is not available here")
    return device


def parameter_digest(model: torch.nn.Module) -> torch.Tensor:
    """SHA-256 of the parameters, as 32 float64 numbers (exactly representable bytes)."""
    digest = hashlib.sha256(flat_vector(model).numpy().tobytes()).digest()
    return torch.tensor(list(digest), dtype=torch.float64)


def check_identical_init(
    comm: GrpcCommunicator,
    topology: TopologyLike,
    model: torch.nn.Module,
    stop: threading.Event | None = None,
) -> None:
    """Fetch each in-neighbour's parameter digest and compare it with ours.

    The wait ends early when ``stop`` is set; each digest exchange ends at the exchange
    deadline at the latest.

    Raises:
        PeerSetupError: a neighbour starts from different parameters (wrong seed or task), or
            its digest did not arrive (the error names it and says whether it is reachable).
    """
    own = parameter_digest(model)
    everyone = sorted(neighbors_over_period(topology, comm.rank))
    # Each fetch uses weight 1 on one neighbour and 0 on us: the result is its digest.
    pending: dict[int, Handle] = {
        j: comm.neighbor_average_async(DIGEST_VECTOR, own, 0, 0.0, {j: 1.0}) for j in everyone
    }
    bad: list[int] = []
    failed: dict[int, str] = {}
    while pending and not (stop is not None and stop.is_set()):
        first = min(pending)
        pending[first].wait_done(STARTUP_POLL_SECONDS)
        for j in [j for j, handle in pending.items() if handle.done()]:
            handle = pending.pop(j)
            try:
                if not torch.equal(handle.wait(0.0), own):
                    bad.append(j)
            except ExchangeError as exc:
                failed[j] = str(exc)
    if pending and stop is not None and stop.is_set():
        raise StartupStopped(
            f"stopped during start-up: peer {comm.rank}: no parameter digest from peers "
            f"{sorted(pending)} yet; {_reachability(comm)}"
        )
    if pending or failed:
        missing = sorted({*pending, *failed})
        why = "stopped while waiting" if pending else "; ".join(failed.values())
        raise PeerSetupError(
            f"peer {comm.rank}: no start-up parameter digest from peers {missing} ({why}); "
            f"{_reachability(comm)}"
        )
    if bad:
        raise PeerSetupError(
            f"peers {bad} start from different parameters than peer {comm.rank}: "
            "check that every peer uses the same manifest, task and seed"
        )


def _reachability(comm: GrpcCommunicator) -> str:
    """Which neighbours answer Info now: tells a dead neighbour from one still starting."""
    try:
        comm.wait_for_neighbors(timeout=REACHABILITY_PROBE_SECONDS)
    except ExchangeError as exc:
        return str(exc)
    return (
        "every neighbour answers Info: the missing ones are still starting "
        "(their logs name the neighbours they wait for)"
    )


def wait_for_neighbors(
    comm: GrpcCommunicator, timeout: float, stop: threading.Event | None = None
) -> dict[int, PeerInfo]:
    """Wait until every neighbour answers Info; a stop request ends the wait at once.

    Returns:
        ``{rank: PeerInfo}`` of every neighbour.

    Raises:
        PeerSetupError: naming the neighbours that did not answer (within ``timeout``, or
            before the stop request).
    """
    try:
        return comm.wait_for_neighbors(timeout, stop=stop)
    except ExchangeError as exc:
        if stop is not None and stop.is_set():
            raise StartupStopped(f"stopped during start-up: {exc}") from None
        raise PeerSetupError(f"{exc} (waited {timeout:.3g} s)") from None


def _exchange_config(manifest: Any, token: str | None) -> Any:
    from peer.transport.grpc.node import ExchangeConfig

    tls = manifest.security.tls
    # PmSGD's all-reduce over gloo cannot lose a rank: its peers keep the strict exchange.
    live = manifest.training.algorithm != "pmsgd"
    return ExchangeConfig.from_spec(
        manifest.exchange,
        token=token,
        tls=None if tls is None else _tls_config(tls),
        manifest_digest=manifest.digest(),
        failure_detection_seconds=manifest.exchange.failure_detection_seconds if live else None,
        known_names=PEER_VECTOR_NAMES,
    )


def _tls_config(tls: Any) -> Any:
    from peer.transport.grpc.security import TlsConfig

    return TlsConfig(
        cert_path=str(tls.cert), key_path=str(tls.key), ca_path=str(tls.ca), mutual=tls.mutual
    )


def resolve_staleness(manifest: Any, override: int | None) -> int:
    """The staleness bound a peer runs with: ``override`` (``--max-staleness``) if given, else
    the manifest's (``training.max_staleness``, which ``exchange.max_staleness`` equals).

    Raises:
        PeerSetupError: the bound is negative, or neighbours would ask for versions that
            ``exchange.retained_versions`` has already dropped.
    """
    staleness = manifest.training.max_staleness if override is None else override
    retained = manifest.exchange.retained_versions
    if staleness < 0:
        raise PeerSetupError(f"max_staleness must be >= 0, got {staleness}")
    if staleness >= retained:
        raise PeerSetupError(
            f"max_staleness {staleness} needs exchange.retained_versions > {staleness} in the "
            f"manifest (it is {retained})"
        )
    return staleness


def read_token(path: Path | None) -> str | None:
    """The bearer token from the manifest's token file, or ``None`` when it names none.

    Raises:
        PeerSetupError: the file cannot be read or is empty.
    """
    if path is None:
        return None
    from peer.transport.grpc.security import read_token_file

    try:
        return read_token_file(path)
    except (OSError, ValueError) as exc:
        raise PeerSetupError(f"token file: {exc}") from exc


def run_peer(options: PeerOptions) -> TrainResult:
    """Run one peer to completion (see the module docstring).

    Returns:
        The peer's result (also written to ``out_dir/peer-<rank>.json``).

    Raises:
        PeerSetupError: the peer could not start.
        topology.manifest.ManifestError: the manifest is invalid.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    from topology.manifest import load_manifest

    # Handlers first: a SIGTERM during set-up ends the start-up waits at once (PeerSetupError
    # naming the neighbours still missing), or, once they are all there, a checkpoint at step 0.
    stop = threading.Event()
    _install_signal_handlers(stop)
    manifest = load_manifest(options.manifest)
    me = find_entry(manifest, options)
    _split_cores(manifest, me)
    rank, world_size = me.rank, manifest.world_size
    training = manifest.training
    staleness = resolve_staleness(manifest, options.max_staleness)
    if options.pipeline and (staleness != 1 or training.algorithm == "pmsgd"):
        raise PeerSetupError(
            f"--pipeline needs max_staleness 1 and a decentralized algorithm, got "
            f"max_staleness {staleness} with {training.algorithm}"
        )
    if staleness > 0 and training.algorithm == "decentlam":
        logger.warning("%s", staleness_cost(training.momentum, staleness))
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topology = manifest.build_topology()
    device = resolve_device(me.device)

    registry = CollectorRegistry()
    metrics = TrainingMetrics(
        registry,
        rank,
        {
            "version": __version__,
            "algorithm": training.algorithm,
            "topology": manifest.topology.graph,
            "world_size": str(world_size),
            "device": str(device),
        },
    )
    # Everything started here is stopped here, in reverse order, however the run ends.
    with contextlib.ExitStack() as owned:
        if me.metrics_port is not None:
            httpd, _ = start_http_server(me.metrics_port, addr=_bind_host(me), registry=registry)
            owned.callback(_stop_http_server, httpd)
            logger.info("metrics on http://%s:%d/metrics", me.host, me.metrics_port)
        token = read_token(manifest.security.token_file)
        started = process_start_time()
        faults = FaultInjector.from_env(rank)
        try:
            comm = _start_communicator(manifest, me, topology, registry, token, options, stop)
        except StartupStopped as exc:
            _stopped_in_startup(out_dir, rank, exc)
        owned.callback(comm.close)
        # Before the first fetch: a stall during start-up shows too. Unset before close.
        live_view = comm.membership
        comm.set_stall_listener(
            neighbor_up_listener(metrics, None if live_view is None else live_view.is_up)
        )
        owned.callback(comm.set_stall_listener, None)
        if faults.plan.drops:
            comm.set_link_filter(faults.link_cut)
        neighbours = frozenset(contacts(topology, rank, world_size, False))
        for neighbor in neighbours:
            metrics.set_neighbor_up(neighbor, True)
        metrics.live_neighbors.set(len(neighbours))
        view = topology.view(rank, 0)
        _report(
            options,
            f"peer {rank}/{world_size} on {me.host}:{me.port} ({training.algorithm}, "
            f"{manifest.topology.graph}): in-neighbours "
            f"{_names(manifest, sorted(view.in_neighbors))}, out-neighbours "
            f"{_names(manifest, sorted(view.out_neighbors))}"
            + ("" if me.metrics_port is None else f"; metrics on port {me.metrics_port}"),
        )
        progress = _Progress(options, rank, training.steps)
        torch.manual_seed(training.seed)
        task = build_task(
            training.task,
            rank,
            world_size,
            {"seed": training.seed, "batch_size": training.batch_size, **training.task_options},
        )
        task.model.to(device)
        live = comm.membership is not None
        ahead = _neighbours_ahead(comm) if live else {}
        if training.algorithm != "pmsgd" and not ahead:
            try:
                check_identical_init(comm, topology, task.model, stop)
            except StartupStopped as exc:
                _stopped_in_startup(out_dir, rank, exc)
        try:
            optimizer = _build_optimizer(manifest, me, task.model, comm, staleness, options, stop)
        except RendezvousStopped as exc:
            # Nothing trained yet: no checkpoint to write (a resume starts from step 0 anyway).
            logger.warning("%s: exiting", exc)
            result = _not_started(rank, str(exc))
            _write_result(out_dir, result)
            return result
        if optimizer.communicator is not comm:  # PmSGD's torch.distributed process group
            owned.callback(optimizer.communicator.close)
        deadline = manifest.exchange.fetch_deadline_seconds
        provider = StepBoundaryState(task.model, optimizer, timeout_seconds=deadline)
        rejoiner: Rejoiner | None = None
        if live:
            comm.set_state_provider(provider)
            rejoiner = Rejoiner(comm, task.model, optimizer, metrics, deadline, neighbours)

        def on_step(step: int, loss: float) -> None:
            comm.set_current_step(step)
            provider.at_boundary(step)
            if rejoiner is not None:
                rejoiner.after_step(step)
            faults.after_step(step)
            progress(step, loss)

        trainer = Trainer(
            task,
            optimizer,
            rank=rank,
            config=TrainerConfig(
                steps=training.steps,
                eval_every=training.eval_every,
                checkpoint_every=training.checkpoint_every,
                checkpoint_dir=out_dir,
                resume=options.resume,
                max_staleness=staleness,
                deadline_seconds=manifest.exchange.fetch_deadline_seconds,
            ),
            communicator=comm if training.algorithm != "pmsgd" else None,
            metrics=metrics,
            on_step=on_step,
            bytes_sent=lambda: sent_bytes(registry),
            stop_event=stop,
            rejoin=None if rejoiner is None else rejoiner.on_fell_behind,
        )
        if rejoiner is not None and ahead:
            _rejoin_at_start(trainer, rejoiner, ahead, started, out_dir, rank, options.resume)
        result = trainer.run()
        provider.finish(trainer.step)
        if not result.failed:
            # current_step = steps + 1 says "finished, final evaluation included" to readers.
            comm.set_current_step(trainer.step + 1)
        if stop.is_set():
            logger.info("peer %d stopped on request: not lingering for readers", rank)
        elif not result.failed:
            _linger(comm, topology, rank, trainer.step, options.linger_seconds)
    membership = None
    if rejoiner is not None:
        membership = {**rejoiner.report(), "incarnation": faults.incarnation}
    path = _write_result(out_dir, result, exchange_latency_summary(registry), membership)
    logger.info("peer %d done: %s", rank, path)
    outcome = "gave up" if result.failed else "stopped" if result.stopped_early else "finished"
    _report(
        options,
        f"peer {rank}: {outcome} at step {result.steps}, loss {result.final_loss:.4g}"
        + "".join(f", {k} {v:.4g}" for k, v in sorted(result.eval.items()))
        + f"; {path}",
    )
    return result


def neighbor_up_listener(
    metrics: TrainingMetrics, is_up: Callable[[int], bool] | None = None
) -> Callable[[int, bool], None]:
    """The stall listener that keeps ``decentlam_neighbor_up`` current while a step is blocked.

    The transport calls it (:meth:`GrpcCommunicator.set_stall_listener`) when a link with a
    fetch pending goes silent (0) and when it speaks again (1); the other writers of the gauge
    (a mixed step, the membership at a step boundary, a peer giving up) are unchanged.

    Args:
        metrics: the peer's training metrics (owner of the gauge).
        is_up: the live membership's view (``Membership.is_up``), or None in strict mode: a
            neighbour it has marked down stays 0 when its silent link speaks again (it is
            re-admitted at a step boundary, by the membership, not here).

    Returns:
        The listener.
    """

    def listener(neighbor: int, stalled: bool) -> None:
        up = not stalled and (is_up is None or is_up(neighbor))
        metrics.set_neighbor_up(neighbor, up)

    return listener


def _neighbours_ahead(comm: GrpcCommunicator) -> dict[int, int]:
    """``{rank: step}`` of neighbours already training (this peer was restarted)."""
    infos = comm.probe_neighbors(timeout=1.0)
    return {r: i.current_step for r, i in infos.items() if i.state_available and i.current_step > 0}


def _rejoin_at_start(
    trainer: Trainer,
    rejoiner: Rejoiner,
    ahead: dict[int, int],
    started: float,
    out_dir: Path,
    rank: int,
    resume: bool,
) -> None:
    """Take the freshest neighbour's state, unless our own checkpoint is at least as recent."""
    path = checkpoint_path(out_dir, rank)
    if resume and path.exists():
        try:
            own_step = int(load_checkpoint(path)["step"])
        except ValueError as exc:
            logger.warning("checkpoint unusable (%s): taking a neighbour's state", exc)
            own_step = -1
        if own_step >= max(ahead.values()):
            logger.info("own checkpoint (step %d) is as recent as the neighbours'", own_step)
            return
        logger.info(
            "own checkpoint (step %d) is older than the neighbours' (step %d): taking theirs",
            own_step, max(ahead.values()),
        )  # fmt: skip
    trainer.step = rejoiner.take_state(ahead, started, "restart")
    trainer.config.resume = False


def _stop_http_server(httpd: Any) -> None:
    """Stop the metrics endpoint's serving thread and close its socket."""
    httpd.shutdown()
    httpd.server_close()


def _report(options: PeerOptions, line: str) -> None:
    if options.report is not None:
        options.report(line)
    else:
        logger.info("%s", line)


def _names(manifest: Any, ranks: list[int]) -> str:
    if not ranks:
        return "none"
    return ", ".join(f"{r} ({manifest.peer(r).host}:{manifest.peer(r).port})" for r in ranks)


class _Progress:
    """Reports ``step, loss, step rate`` every ``progress_seconds`` (called after each step)."""

    def __init__(self, options: PeerOptions, rank: int, steps: int) -> None:
        self.options = options
        self.rank = rank
        self.steps = steps
        self.last_time = time.monotonic()
        self.last_step: int | None = None

    def __call__(self, step: int, loss: float) -> None:
        every = self.options.progress_seconds
        now = time.monotonic()
        if self.last_step is None:
            self.last_step, self.last_time = step - 1, now
        if every <= 0 or now - self.last_time < every:
            return
        rate = (step - self.last_step) / (now - self.last_time)
        self.last_step, self.last_time = step, now
        _report(
            self.options,
            f"peer {self.rank}: step {step}/{self.steps}, loss {loss:.4g}, {rate:.1f} steps/s",
        )


def _split_cores(manifest: Any, me: Any) -> None:
    """Peers of the manifest on the same host share its cores (as ``launch`` does locally)."""
    threads = os.environ.get("DECENTLAM_TORCH_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))
        return
    sharing = sum(1 for p in manifest.peers if p.host == me.host)
    if sharing > 1:
        count = max(1, (os.cpu_count() or 1) // sharing)
        torch.set_num_threads(count)
        logger.info("%d peers on %s: %d torch threads each", sharing, me.host, count)


def exchange_latency_summary(registry: Any) -> dict[str, dict[str, float]]:
    """Per in-neighbour exchange latency: fetch count, mean, p50 and p95 (seconds), from the
    ``decentlam_exchange_latency_seconds`` histogram (p50/p95 interpolated in its buckets)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for family in registry.collect():
        if family.name != "decentlam_exchange_latency_seconds":
            continue
        for sample in family.samples:
            neighbor = sample.labels.get("neighbor", "?")
            if sample.name.endswith("_bucket"):
                buckets.setdefault(neighbor, []).append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                sums[neighbor] = sample.value
    summary = {}
    for neighbor, cumulative in sorted(buckets.items()):
        cumulative.sort()
        count = cumulative[-1][1]
        if count <= 0:
            continue
        summary[neighbor] = {
            "count": count,
            "mean_seconds": sums.get(neighbor, math.nan) / count,
            "p50_seconds": _bucket_quantile(0.5, cumulative),
            "p95_seconds": _bucket_quantile(0.95, cumulative),
        }
    return summary


def _bucket_quantile(quantile: float, cumulative: list[tuple[float, float]]) -> float:
    # Same interpolation as Prometheus' histogram_quantile (linear within a bucket).
    rank = quantile * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * (
                (rank - lower_count) / width if width else 1.0
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def find_entry(manifest: Any, options: PeerOptions) -> Any:
    """This peer's manifest entry: ``--rank``, else ``--host`` and ``--port``, else the one
    entry whose host is this machine (``--local-index`` / ``--port`` choose among several).

    Raises:
        PeerSetupError: no entry, or several, match (the message says how to choose).
    """
    from peer.transport import netif

    if options.rank is not None:
        return manifest.peer(options.rank)
    if options.host is not None and options.port is not None:
        return manifest.find_peer(options.host, options.port)
    addresses = set().union(*netif.interface_addresses().values())
    try:
        me = netif.own_entry(
            manifest.peers,
            addresses,
            netif.local_names(),
            netif.resolve,
            local_index=options.local_index,
            port=options.port,
        )
    except netif.NoOwnEntry as exc:
        raise PeerSetupError(str(exc)) from exc
    logger.info("this machine is peer %d of the manifest (%s:%d)", me.rank, me.host, me.port)
    return me


def _write_result(
    out_dir: Path,
    result: TrainResult,
    latency: dict[str, dict[str, float]] | None = None,
    membership: dict[str, Any] | None = None,
) -> Path:
    path = out_dir / f"peer-{result.rank}.json"
    tmp = path.with_suffix(".json.tmp")
    payload = {**result.to_dict(), "exchange_latency": latency or {}}
    if membership is not None:
        payload["membership"] = membership
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    return path


def _stopped_in_startup(out_dir: Path, rank: int, exc: StartupStopped) -> NoReturn:
    """A stop request during start-up: nothing trained, no checkpoint. ``peer-<r>.json`` says
    so (``stopped_early``, the reason), then the error goes up (the CLI prints it, exit 2)."""
    _write_result(out_dir, _not_started(rank, str(exc)))
    raise exc


def _not_started(rank: int, reason: str) -> TrainResult:
    nan = float("nan")
    return TrainResult(
        rank=rank, steps=0, start_step=0, stopped_early=True, final_loss=nan, eval={},
        mean_iteration_seconds=nan, mean_compute_seconds=nan, mean_blocked_seconds=nan,
        total_seconds=0.0, bytes_received=0, bytes_sent=0, consensus_distance=nan,
        max_staleness_seen=0, stop_reason=reason,
    )  # fmt: skip


def _bind_host(me: Any) -> str:
    """Where this peer's servers listen: the manifest's ``bind``, else :func:`_metrics_bind`."""
    bind = getattr(me, "bind", None)
    return bind if bind else _metrics_bind(me.host)


def _metrics_bind(host: str) -> str:
    # Loopback manifests keep the endpoint private; any other host listens on all interfaces
    # (inside a container the manifest host is the service name).
    return host if host.startswith("127.") or host in {"localhost", "::1"} else "0.0.0.0"


def contacts(
    topology: TopologyLike, rank: int, world_size: int, global_averaging: bool
) -> set[int]:
    """Peers this one talks to: in- and out-neighbours over a period (everyone if it averages
    globally)."""
    if global_averaging:
        return set(range(world_size)) - {rank}
    return neighbors_over_period(topology, rank, incoming=True, outgoing=True)


def _start_communicator(
    manifest: Any,
    me: Any,
    topology: TopologyLike,
    registry: Any,
    token: str | None,
    options: PeerOptions,
    stop: threading.Event,
) -> GrpcCommunicator:
    from peer.transport.grpc.communicator import GrpcCommunicator

    training = manifest.training
    wanted = contacts(
        topology,
        me.rank,
        manifest.world_size,
        training.algorithm == "pmsgd" or training.global_average_every > 0,
    )
    peers = {p.rank: p.address for p in manifest.peers if p.rank in wanted}
    bind = options.bind or os.environ.get("DECENTLAM_BIND") or f"{_bind_host(me)}:{me.port}"
    comm = GrpcCommunicator.start(
        me.rank,
        peers,
        topology=topology,
        config=dataclasses.replace(
            _exchange_config(manifest, token),
            trace_dir=None if options.trace_exchanges is None else str(options.trace_exchanges),
        ),
        bind=bind,
        world_size=manifest.world_size,
        registry=registry,
    )
    try:
        infos = comm.probe_neighbors(timeout=1.0)
        if comm.membership is None or not any(i.current_step > 0 for i in infos.values()):
            # A fresh start: every neighbour must come (a rejoining peer needs only one).
            infos = wait_for_neighbors(comm, manifest.exchange.connect_deadline_seconds, stop)
        mismatched = sorted(
            r for r, info in infos.items() if info.manifest_digest != manifest.digest()
        )
        if mismatched:
            raise PeerSetupError(
                f"peers {mismatched} run a different manifest than peer {me.rank} "
                f"(digest {manifest.digest()[:12]}): give every peer the same file"
            )
    except ExchangeError as exc:
        comm.close()
        raise PeerSetupError(str(exc)) from exc
    except BaseException:
        comm.close()
        raise
    return comm


def sent_bytes(registry: Any) -> int:
    """Bytes this peer has served to readers (from its exchange metrics)."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "decentlam_exchange_sent_bytes_total":
                total += sample.value
    return int(total)


def _build_optimizer(
    manifest: Any,
    me: Any,
    model: torch.nn.Module,
    comm: Communicator,
    staleness: int,
    options: PeerOptions,
    stop: threading.Event,
) -> DecentralizedOptimizer:
    from peer.algorithms.schedules import make_schedule
    from peer.training.optim import make_optimizer

    training = manifest.training
    schedule = make_schedule(
        schedule_spec(training.lr_schedule.to_dict()), training.lr, training.steps
    )
    communicator: Communicator = comm
    if training.algorithm == "pmsgd":
        communicator = _join_process_group(manifest, me, options, stop)
    return make_optimizer(
        training.algorithm,
        model.parameters(),
        lr=training.lr,
        momentum=training.momentum,
        weight_decay=training.weight_decay,
        communicator=communicator,
        schedule=schedule,
        global_average_every=training.global_average_every,
        max_staleness=staleness,
        overlap=not options.blocking,
        pipeline=options.pipeline,
        bucket_bytes=manifest.exchange.bucket_bytes,
        deadline_seconds=manifest.exchange.fetch_deadline_seconds,
    )


def _join_process_group(
    manifest: Any, me: Any, options: PeerOptions, stop: threading.Event
) -> Communicator:
    """PmSGD's gloo/NCCL group, over the interface that carries this peer's manifest address."""
    from peer.transport import netif
    from peer.transport.dist import TorchDistributedCommunicator

    interface = None
    for address in sorted(netif.resolve(me.host)):
        interface = netif.interface_for(address)
        if interface is not None:
            break
    if interface is None:
        logger.warning(
            "no interface of this machine carries %s (peer %d's manifest host): gloo/NCCL "
            "choose their own; set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME if they fail",
            me.host, me.rank,
        )  # fmt: skip
    init_method = options.dist_init_method or default_dist_init(manifest)
    try:
        return TorchDistributedCommunicator.start(
            me.rank,
            manifest.world_size,
            init_method=init_method,
            timeout_seconds=manifest.exchange.connect_deadline_seconds,
            interface=interface,
            stop=stop,
        )
    except ExchangeError as exc:
        raise PeerSetupError(f"peer {me.rank}: {exc}") from exc


def schedule_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Map the manifest's ``training.lr_schedule`` onto
    :func:`peer.algorithms.schedules.make_schedule`.

    The manifest has one flat set of fields; each schedule takes only its own. A warmup on
    ``constant`` or ``step`` wraps the schedule in a linear warmup.
    """
    name = spec.get("name", "constant")
    warmup = int(spec.get("warmup_steps", 0))
    if name == "cosine":
        return {"name": "cosine", "warmup_steps": warmup, "min_lr": spec.get("min_lr", 0.0)}
    if name == "warmup":
        return {"name": "warmup", "warmup_steps": warmup}
    if name == "step":
        inner: dict[str, Any] = {
            "name": "step",
            "milestones": [int(m) - warmup for m in spec.get("milestones", ())],
            "gamma": spec.get("gamma", 0.1),
        }
    else:
        inner = {"name": "constant"}
    if warmup > 0:
        return {"name": "warmup", "warmup_steps": warmup, "then": inner}
    return inner


def default_dist_init(manifest: Any) -> str:
    """Default ``torch.distributed`` rendezvous: peer 0's host, its gRPC port + 1000."""
    first = manifest.peers[0]
    return f"tcp://{first.address.rsplit(':', 1)[0]}:{(first.port + 1000 - 1) % 65535 + 1}"


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        logger.warning("signal %d: stopping after the current step", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not in the main thread (tests): the caller stops the trainer
            return


def _linger(
    comm: GrpcCommunicator,
    topology: TopologyLike,
    rank: int,
    last_step: int,
    budget_seconds: float,
) -> None:
    """Keep serving until every out-neighbour has finished (or the budget ends).

    Without this the fastest peer would stop its server while slower neighbours still need its
    final vectors. It is not a barrier: it waits only on this peer's own readers, only at exit,
    and a reader that is gone (stopped, crashed) is not waited for.
    """
    readers = neighbors_over_period(topology, rank, incoming=False, outgoing=True)
    deadline = time.monotonic() + budget_seconds
    while readers and time.monotonic() < deadline:
        try:
            infos = comm.wait_for_neighbors(timeout=2.0)
        except TimeoutError:  # the exchange loop itself is starved (heavily loaded machine)
            time.sleep(0.05)
            continue
        except ExchangeError as exc:
            logger.info("a reader is gone (%s): not waiting for it", exc)
            return
        readers = {j for j in readers if j in infos and infos[j].current_step <= last_step}
        if readers:
            time.sleep(0.05)
    if readers:
        logger.warning("stopping while peers %s may still need step %d", sorted(readers), last_step)
