"""The ``decentlam.v1.Peer`` RPC table, read from the proto's service declaration.

The server's method handlers and the client's callables are both built from :data:`RPCS`,
which comes from the compiled service descriptor (the same declaration ``protoc`` turns into
``peer_pb2_grpc``): a method added to ``protos/decentlam/v1/peer.proto`` shows up on both sides
or fails loudly on both. The generated ``PeerStub``/``add_PeerServicer_to_server`` are not
used because the chunk path needs its own serializers: responses that are pre-encoded bytes
pass through (:func:`~peer.transport.grpc.wire.serialize_message`), chunks are decoded into
memoryviews without a protobuf parse, and undecodable requests become ``None`` (answered
INVALID_ARGUMENT) instead of an opaque INTERNAL error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.wire import serialize_message

logger = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["Peer"]
SERVICE_NAME: str = _SERVICE.full_name


@dataclass(frozen=True)
class Rpc:
    """One method of the service.

    Attributes:
        name: method name (``Fetch``).
        path: the full method path on the wire (``/decentlam.v1.Peer/Fetch``).
        request_type: the request message class.
        server_streaming: whether the response is a stream.
    """

    name: str
    path: str
    request_type: type[Message]
    server_streaming: bool


RPCS: dict[str, Rpc] = {
    method.name: Rpc(
        name=method.name,
        path=f"/{SERVICE_NAME}/{method.name}",
        request_type=getattr(pb, method.input_type.name),
        server_streaming=method.server_streaming,
    )
    for method in _SERVICE.methods
    if not method.client_streaming  # none is: the table would need another handler kind
}
if len(RPCS) != len(_SERVICE.methods):  # pragma: no cover - a proto change, caught at import
    raise ImportError(f"{SERVICE_NAME}: client-streaming methods are not supported")


def _same_methods(given: Mapping[str, object], side: str) -> None:
    if set(given) != set(RPCS):
        missing, extra = sorted(set(RPCS) - set(given)), sorted(set(given) - set(RPCS))
        raise ValueError(f"{side} of {SERVICE_NAME}: missing {missing}, unknown {extra}")


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Request deserializer that yields None for undecodable bytes (answered INVALID_ARGUMENT)."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError):
            return None

    return deserialize


def server_handler(handlers: Mapping[str, Callable[..., Any]]) -> grpc.GenericRpcHandler:
    """The service's method handlers for a ``grpc.aio`` server.

    Args:
        handlers: ``{method name: async handler}``, one for every method of :data:`RPCS`.

    Returns:
        A generic handler: requests are parsed leniently (``None`` when undecodable),
        responses go through :func:`~peer.transport.grpc.wire.serialize_message`.

    Raises:
        ValueError: a method of the service has no handler, or a handler no method.
    """
    _same_methods(handlers, "server")
    table = {}
    for name, rpc in RPCS.items():
        factory = (
            grpc.unary_stream_rpc_method_handler
            if rpc.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        table[name] = factory(
            handlers[name],
            request_deserializer=_lenient(rpc.request_type.FromString),
            response_serializer=serialize_message,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, table)


def client_callables(
    channel: grpc.aio.Channel, response_deserializers: Mapping[str, Callable[[bytes], Any]]
) -> dict[str, Any]:
    """One multi-callable per method of the service on ``channel``.

    Args:
        channel: the channel to the neighbour.
        response_deserializers: ``{method name: deserializer}`` for every method.

    Returns:
        ``{method name: multi-callable}`` (unary-stream or unary-unary as declared).

    Raises:
        ValueError: the deserializers do not cover exactly the service's methods.
    """
    _same_methods(response_deserializers, "client")
    callables: dict[str, Any] = {}
    for name, rpc in RPCS.items():
        make = channel.unary_stream if rpc.server_streaming else channel.unary_unary
        callables[name] = make(
            rpc.path,
            request_serializer=rpc.request_type.SerializeToString,
            response_deserializer=response_deserializers[name],
        )
    return callables
