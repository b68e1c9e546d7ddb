"""One peer process: manifest in, a trained model, checkpoints and a result file out.

``run_peer`` is what ``decentlam peer --manifest m.yaml --rank R`` runs:

1. load and validate the manifest, find this peer's entry (by rank, or by host and port);
2. start the metrics endpoint and the gRPC service (in a background thread);
3. wait, with a deadline, until every neighbour answers (the error names the missing ones);
4. build the task under the manifest's seed and check, by exchanging a digest, that every
   neighbour starts from identical parameters;
5. train with the manifest's algorithm (overlapped exchanges unless ``blocking``);
6. on SIGTERM/SIGINT or at the end: checkpoint, keep serving until the out-neighbours have
   fetched the last step (bounded by a deadline), stop serving, write ``peer-<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peer.errors import ExchangeError
from peer.training.metrics import TrainingMetrics
from peer.training.tasks import build_task
from peer.training.trainer import Trainer, TrainerConfig, TrainResult, flat_vector
from peer.transport.base import Communicator

logger = logging.getLogger(__name__)

DIGEST_VECTOR = "startup/param-digest"
VERSION = "0.1.0"


class PeerSetupError(RuntimeError):
    """The peer could not start (bad manifest entry, neighbours unreachable, different init)."""


@dataclass
class PeerOptions:
    """Command-line options of one peer (flags override the manifest).

    Attributes:
        manifest: path of the manifest.
        rank: this peer's rank; ``None`` finds it by ``host``/``port``.
        host, port: used to find the entry when ``rank`` is ``None``.
        out_dir: checkpoints, ``peer-<r>.json`` (default: ``./decentlam-out``).
        resume: continue from ``out_dir/rank-<r>.pt``.
        blocking: turn overlap off (exchanges start in ``step()`` and are waited at once).
        max_staleness: overrides the manifest's bound when not ``None``.
        bind: address the gRPC server binds (default: the manifest host and port).
        dist_init_method: ``torch.distributed`` rendezvous for ``pmsgd``.
        linger_seconds: after the last step, how long to keep serving for slower neighbours.
    """

    manifest: Path
    rank: int | None = None
    host: str | None = None
    port: int | None = None
    out_dir: Path = Path("decentlam-out")
    resume: bool = False
    blocking: bool = False
    max_staleness: int | None = None
    bind: str | None = None
    dist_init_method: str | None = None
    linger_seconds: float = 60.0


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


def check_identical_init(comm: Communicator, topology: Any, model: torch.nn.Module) -> None:
    """Fetch each in-neighbour's parameter digest and compare it with ours.

    Raises:
        PeerSetupError: a neighbour starts from different parameters (wrong seed or task).
    """
    own = parameter_digest(model)
    neighbours: set[int] = set()
    for k in range(max(1, topology.period)):
        neighbours.update(topology.view(comm.rank, k).in_neighbors)
    everyone = sorted(neighbours)
    # Each fetch uses weight 1 on one neighbour and 0 on us: the result is its digest.
    handles = {
        j: comm.neighbor_average_async(DIGEST_VECTOR, own, 0, 0.0, {j: 1.0}) for j in everyone
    }
    bad = [j for j, h in handles.items() if not torch.equal(h.wait(), own)]
    if bad:
        raise PeerSetupError(
            f"peers {bad} start from different parameters than peer {comm.rank}: "
            "check that every peer uses the same manifest, task and seed"
        )


def _exchange_config(manifest: Any, token: str | None) -> Any:
    from peer.transport.grpc.node import ExchangeConfig

    tls = manifest.security.tls
    return ExchangeConfig.from_spec(
        manifest.exchange,
        token=token,
        tls=None if tls is None else _tls_config(tls),
        manifest_digest=manifest.digest(),
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
    """The bearer token from the manifest's token file (stripped), or ``None``."""
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise PeerSetupError(f"token file {path} is empty")
    return token


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

    # Handlers first: a SIGTERM during set-up must also end in a checkpoint and exit 0.
    stop = threading.Event()
    _install_signal_handlers(stop)
    threads = os.environ.get("DECENTLAM_TORCH_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    manifest = load_manifest(options.manifest)
    if options.rank is not None:
        me = manifest.peer(options.rank)
    elif options.host is not None and options.port is not None:
        me = manifest.find_peer(options.host, options.port)
    else:
        raise PeerSetupError("give --rank, or --host and --port to find this peer's entry")
    rank, world_size = me.rank, manifest.world_size
    training = manifest.training
    staleness = resolve_staleness(manifest, options.max_staleness)
    if staleness > 0 and training.algorithm == "decentlam":
        logger.warning(
            "DecentLaM with max_staleness=%d is unstable in our measurements (stale positions "
            "feed its momentum term); prefer dmsgd or dsgd for asynchronous runs",
            staleness,
        )
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topology = manifest.build_topology()
    device = resolve_device(me.device)

    registry = CollectorRegistry()
    metrics = TrainingMetrics(
        registry,
        rank,
        {
            "version": VERSION,
            "algorithm": training.algorithm,
            "topology": manifest.topology.graph,
            "world_size": str(world_size),
            "device": str(device),
        },
    )
    if me.metrics_port is not None:
        start_http_server(me.metrics_port, addr=_metrics_bind(me.host), registry=registry)
        logger.info("metrics on http://%s:%d/metrics", me.host, me.metrics_port)

    token = read_token(manifest.security.token_file)
    comm = _start_communicator(manifest, me, topology, registry, token, options)
    for neighbor in contacts(topology, rank, world_size, False):
        metrics.set_neighbor_up(neighbor, True)
    trainer: Trainer | None = None
    try:
        torch.manual_seed(training.seed)
        task = build_task(
            training.task,
            rank,
            world_size,
            {"seed": training.seed, "batch_size": training.batch_size, **training.task_options},
        )
        task.model.to(device)
        if training.algorithm != "pmsgd":
            check_identical_init(comm, topology, task.model)
        optimizer = _build_optimizer(manifest, task.model, comm, staleness, options)
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
            on_step=lambda step, loss: comm.set_current_step(step),
            bytes_sent=lambda: sent_bytes(registry),
            stop_event=stop,
        )
        result = trainer.run()
        # current_step = steps + 1 says "finished, final evaluation included" to the readers.
        comm.set_current_step(trainer.step + 1)
        _linger(comm, topology, rank, trainer.step, options.linger_seconds)
    finally:
        comm.close()
    path = out_dir / f"peer-{rank}.json"
    path.write_text(json.dumps(result.to_dict(), indent=2, default=float))
    logger.info("peer %d done: %s", rank, path)
    return result


def _metrics_bind(host: str) -> str:
    # Loopback manifests keep the endpoint private; any other host listens on all interfaces
    # (inside a container the manifest host is the service name).
    return host if host.startswith("127.") or host in {"localhost", "::1"} else "0.0.0.0"


def contacts(topology: Any, rank: int, world_size: int, global_averaging: bool) -> set[int]:
    """Peers this one talks to: in- and out-neighbours over a period (everyone if it averages
    globally)."""
    if global_averaging:
        return set(range(world_size)) - {rank}
    found: set[int] = set()
    for k in range(max(1, topology.period)):
        view = topology.view(rank, k)
        found.update(view.in_neighbors)
        found.update(view.out_neighbors)
    return found - {rank}


def _start_communicator(
    manifest: Any, me: Any, topology: Any, registry: Any, token: str | None, options: PeerOptions
) -> Any:
    from peer.transport.grpc.communicator import GrpcCommunicator

    training = manifest.training
    wanted = contacts(
        topology,
        me.rank,
        manifest.world_size,
        training.algorithm == "pmsgd" or training.global_average_every > 0,
    )
    peers = {p.rank: p.address for p in manifest.peers if p.rank in wanted}
    bind = options.bind or os.environ.get("DECENTLAM_BIND") or f"{_metrics_bind(me.host)}:{me.port}"
    comm = GrpcCommunicator.start(
        me.rank,
        peers,
        topology=topology,
        config=_exchange_config(manifest, token),
        bind=bind,
        world_size=manifest.world_size,
        registry=registry,
    )
    try:
        infos = comm.wait_for_neighbors(timeout=manifest.exchange.connect_deadline_seconds)
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
    manifest: Any, model: torch.nn.Module, comm: Communicator, staleness: int, options: PeerOptions
) -> torch.optim.Optimizer:
    from peer.algorithms.schedules import make_schedule
    from peer.training.optim import make_optimizer

    training = manifest.training
    schedule = make_schedule(
        schedule_spec(training.lr_schedule.to_dict()), training.lr, training.steps
    )
    communicator: Communicator = comm
    if training.algorithm == "pmsgd":
        from peer.transport.dist import TorchDistributedCommunicator

        communicator = TorchDistributedCommunicator.start(
            comm.rank,
            manifest.world_size,
            init_method=options.dist_init_method or default_dist_init(manifest),
            timeout_seconds=manifest.exchange.connect_deadline_seconds,
        )
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
        bucket_bytes=manifest.exchange.bucket_bytes,
        deadline_seconds=manifest.exchange.fetch_deadline_seconds,
    )


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


def _linger(comm: Any, topology: Any, rank: int, last_step: int, budget_seconds: float) -> None:
    """Keep serving until every out-neighbour has finished (or the budget ends).

    Without this the fastest peer would stop its server while slower neighbours still need its
    final vectors. It is not a barrier: it waits only on this peer's own readers, only at exit,
    and a reader that is gone (stopped, crashed) is not waited for.
    """
    readers: set[int] = set()
    for k in range(max(1, topology.period)):
        readers.update(topology.view(rank, k).out_neighbors)
    deadline = time.monotonic() + budget_seconds
    while readers and time.monotonic() < deadline:
        try:
            infos = comm.wait_for_neighbors(timeout=2.0)
        except ExchangeError as exc:
            logger.info("a reader is gone (%s): not waiting for it", exc)
            return
        readers = {j for j in readers if j in infos and infos[j].current_step <= last_step}
        if readers:
            time.sleep(0.05)
    if readers:
        logger.warning("stopping while peers %s may still need step %d", sorted(readers), last_step)
