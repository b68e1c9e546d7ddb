"""The ``decentlam`` command line: topology inspection, manifests, simulation and clusters."""
