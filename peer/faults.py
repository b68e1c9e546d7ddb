"""Deterministic fault injection for tests and demos (off unless ``DECENTLAM_FAULTS`` is set).

Faults are named by rank and step, never left to timing (STYLE.md rule 10, torchft's
``EventInjector``)::

    DECENTLAM_FAULTS="kill:2@140,drop:0->1@50+20,delay:3=0.05,stall:1@80=20"

* ``kill:R@K`` -- peer ``R`` kills itself with SIGKILL when it completes step ``K`` (no
  checkpoint, no goodbye: what ``kill -9`` does).
* ``drop:I->J@K+D`` -- the link that carries ``I``'s vectors to ``J`` is cut for steps
  ``[K, K + D)``: ``J``'s fetches and probes of ``I`` fail as if ``I`` were unreachable.
* ``delay:R=S`` -- peer ``R`` sleeps ``S`` seconds after every step (a slow peer).
* ``stall:R@K=S`` -- peer ``R`` stops itself with SIGSTOP at step ``K`` for ``S`` seconds (a
  helper process sends SIGCONT), like a peer frozen by its host.

``kill`` and ``stall`` fire in a peer's first incarnation only (``DECENTLAM_RESTART_COUNT``
unset or 0), so a peer restarted by ``decentlam launch --max-restarts`` trains on.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

FAULTS_ENV = "DECENTLAM_FAULTS"
RESTART_COUNT_ENV = "DECENTLAM_RESTART_COUNT"

_PATTERNS = {
    "kill": re.compile(r"^(\d+)@(\d+)$"),
    "drop": re.compile(r"^(\d+)->(\d+)@(\d+)\+(\d+)$"),
    "delay": re.compile(r"^(\d+)=([0-9.]+)$"),
    "stall": re.compile(r"^(\d+)@(\d+)=([0-9.]+)$"),
}


class FaultSpecError(ValueError):
    """A fault specification that does not parse."""


@dataclass(frozen=True)
class LinkDrop:
    """The link ``src -> dst`` is cut for steps ``[step, step + steps)``."""

    src: int
    dst: int
    step: int
    steps: int

    def active(self, src: int, dst: int, step: int) -> bool:
        """Whether it cuts ``src -> dst`` at ``step``."""
        return (src, dst) == (self.src, self.dst) and self.step <= step < self.step + self.steps


@dataclass(frozen=True)
class FaultPlan:
    """Every injected fault of a run.

    Attributes:
        kills: ``{rank: step}``.
        drops: the cut links.
        delays: ``{rank: seconds per step}``.
        stalls: ``{rank: (step, seconds)}``.
    """

    kills: Mapping[int, int] = field(default_factory=dict)
    drops: tuple[LinkDrop, ...] = ()
    delays: Mapping[int, float] = field(default_factory=dict)
    stalls: Mapping[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No fault at all."""
        return not (self.kills or self.drops or self.delays or self.stalls)

    def link_cut(self, src: int, dst: int, step: int) -> bool:
        """Whether the link ``src -> dst`` is cut at ``step``."""
        return any(drop.active(src, dst, step) for drop in self.drops)


def parse_faults(text: str | None) -> FaultPlan:
    """Parse a ``DECENTLAM_FAULTS`` value (comma-separated, see the module docstring).

    Raises:
        FaultSpecError: naming the entry that does not parse.
    """
    kills: dict[int, int] = {}
    drops: list[LinkDrop] = []
    delays: dict[int, float] = {}
    stalls: dict[int, tuple[int, float]] = {}
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        kind, _, rest = entry.partition(":")
        pattern = _PATTERNS.get(kind)
        match = pattern.match(rest.replace(" ", "")) if pattern else None
        if match is None:
            raise FaultSpecError(
                f"fault {entry!r} does not parse; expected kill:R@K, drop:I->J@K+D, "
                "delay:R=SECONDS or stall:R@K=SECONDS"
            )
        values = match.groups()
        if kind == "kill":
            kills[int(values[0])] = int(values[1])
        elif kind == "drop":
            drops.append(LinkDrop(*(int(v) for v in values)))
        elif kind == "delay":
            delays[int(values[0])] = float(values[1])
        else:
            stalls[int(values[0])] = (int(values[1]), float(values[2]))
    return FaultPlan(kills, tuple(drops), delays, stalls)


class FaultInjector:
    """Executes one peer's share of a :class:`FaultPlan` at step boundaries.

    Args:
        plan: the run's faults.
        rank: this peer.
        incarnation: how many times this peer was restarted (kills and stalls fire at 0 only).
    """

    def __init__(self, plan: FaultPlan, rank: int, incarnation: int = 0) -> None:
        self.plan = plan
        self.rank = rank
        self.incarnation = incarnation

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] | None = None) -> FaultInjector:
        """The injector described by ``DECENTLAM_FAULTS`` (an empty plan when unset)."""
        env = os.environ if environ is None else environ
        plan = parse_faults(env.get(FAULTS_ENV))
        incarnation = int(env.get(RESTART_COUNT_ENV, "0") or 0)
        if not plan.empty:
            logger.warning("fault injection on (%s=%r)", FAULTS_ENV, env.get(FAULTS_ENV))
        return cls(plan, rank, incarnation)

    def link_cut(self, src: int, dst: int, step: int) -> bool:
        """Whether the link ``src -> dst`` is cut at ``step``."""
        return self.plan.link_cut(src, dst, step)

    def after_step(self, step: int) -> None:
        """Run this peer's faults due after completing ``step``."""
        delay = self.plan.delays.get(self.rank)
        if delay:
            time.sleep(delay)
        if self.incarnation:
            return
        if self.plan.kills.get(self.rank) == step:
            logger.warning("fault injection: peer %d killed at step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        stall = self.plan.stalls.get(self.rank)
        if stall is not None and stall[0] == step:
            seconds = stall[1]
            logger.warning(
                "fault injection: peer %d stalled %.3g s at step %d", self.rank, seconds, step
            )
            # A helper wakes us: a stopped process cannot send itself SIGCONT.
            subprocess.Popen(
                ["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"],
                start_new_session=True,
            )
            os.kill(os.getpid(), signal.SIGSTOP)
