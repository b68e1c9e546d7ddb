"""The fluid uplink model of ``benchmarks/uplink_model.py``: its graph is the peers' one-peer
exponential graph, and without jitter the schedule runs at exactly transfer + compute."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from topology import make_topology


def _load_model():  # benchmarks/ is a folder of scripts, not a package
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "uplink_model.py"
    spec = importlib.util.spec_from_file_location("uplink_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["uplink_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_model = _load_model()
simulate, source = _model.simulate, _model.source


@pytest.mark.parametrize("n", [2, 4, 8])
def test_pulls_follow_the_one_peer_exponential_in_neighbours(n: int) -> None:
    topology = make_topology("one-peer-exponential", n)
    for step in range(6):
        w = np.asarray(topology.mixing_matrix(step))
        for peer in range(n):
            others = [j for j in np.nonzero(w[peer] > 0)[0] if j != peer]
            assert others == [source(peer, step, n)]


@pytest.mark.parametrize("share", ["even", "oldest"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_schedule_settles_at_transfer_plus_compute(n: int, share: str) -> None:
    exact = simulate(n, steps=40, transfer=0.4, compute=0.01, jitter=0.0, skew=0.0, share=share)
    assert exact == pytest.approx(0.41, rel=1e-9)
    # Start-up skew of 2 s dies out: the steady state is the same.
    skewed = simulate(n, steps=80, transfer=0.4, compute=0.01, jitter=0.0, skew=2.0, share=share)
    assert skewed == pytest.approx(0.41, rel=1e-6)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        simulate(4, share="random")
    with pytest.raises(ValueError, match="steps"):
        simulate(4, steps=5)
    with pytest.raises(ValueError, match="2 peers"):
        source(0, 0, 1)
