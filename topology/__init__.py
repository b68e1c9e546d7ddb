"""Pure topology code: graphs, mixing weights, spectral gap, manifest schema and validation.

Everything here is numpy-only math except the manifest: :mod:`topology.schema` and
:mod:`topology.manifest_specs` define its schema on pydantic (one definition, range and default
per setting), and :mod:`topology.manifest` reads and writes the YAML files. The names most
code needs are re-exported here::

    from topology import make_topology
    topo = make_topology("exponential", 8)          # weights "auto" -> metropolis
    W = topo.mixing_matrix(k)                       # x_i <- sum_j W[i, j] x_j
    view = topo.view(rank, k)                       # self weight, in/out neighbours
"""

from topology.checks import TopologyError, check_mixing_matrix
from topology.graphs import GRAPH_NAMES, Graph, make_graph
from topology.manifest import (
    Manifest,
    ManifestError,
    dump_manifest,
    init_manifest,
    load_manifest,
    parse_manifest,
)
from topology.mixing import metropolis_hastings_weights, uniform_neighbor_weights
from topology.spectral import consensus_rate, period_consensus_rate, spectral_gap
from topology.topology import PeerView, Topology, make_topology

__all__ = [
    "GRAPH_NAMES",
    "Graph",
    "Manifest",
    "ManifestError",
    "PeerView",
    "Topology",
    "TopologyError",
    "check_mixing_matrix",
    "consensus_rate",
    "dump_manifest",
    "init_manifest",
    "load_manifest",
    "make_graph",
    "make_topology",
    "metropolis_hastings_weights",
    "parse_manifest",
    "period_consensus_rate",
    "spectral_gap",
    "uniform_neighbor_weights",
]
