"""The gRPC exchange engine (service ``decentlam.v1.Peer``, see ``protos/``).

Stacked from the wire up: :mod:`~.framing` (chunking, checksums) and :mod:`~.wire` (protobuf
headers to domain objects, reassembly) on the generated stubs in :mod:`~.proto`;
:mod:`~.store` (the retained published versions); :mod:`~.server` (the servicer) and
:mod:`~.client` (one channel per neighbour), with :mod:`~.security` (tokens, TLS),
:mod:`~.throttle` (bandwidth caps), :mod:`~.metrics` (per-edge Prometheus collectors) and
:mod:`~.progress` (per-neighbour progress of the fetches in flight, the stall decision);
:mod:`~.node` (the asyncio core: server + clients in one loop); :mod:`~.communicator`
(:class:`~.communicator.GrpcCommunicator`, the synchronous Communicator facade).

This is the only package that imports grpc and the generated stubs.
"""
