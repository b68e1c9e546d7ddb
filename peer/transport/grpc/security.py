"""Authentication and authorisation of exchange RPCs, and TLS credentials.

* Every request carries ``authorization: Bearer <token>`` and ``x-decentlam-rank: <rank>`` in its
  metadata. :class:`AuthInterceptor` (a ``grpc.aio`` server interceptor) rejects a missing or
  wrong token with UNAUTHENTICATED and a rank that is not a peer of the run with
  PERMISSION_DENIED, before any handler runs.
* Which vectors a known rank may read depends on the request body, so the servicer asks
  :class:`ReadPolicy`: a partial-average vector may be read by the server's out-neighbours over
  the topology's period, a global-average vector (``peer.transport.base.GLOBAL_PREFIX``) and
  Info/GetState
  by any peer of the run.
* :func:`server_credentials` / :func:`channel_credentials` build TLS (server cert + CA) and
  mutual-TLS credentials from :class:`TlsConfig` paths.

The token itself is read from the file the run manifest names (:func:`read_token_file`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from peer.transport.base import GLOBAL_PREFIX, TopologyLike, neighbors_over_period

logger = logging.getLogger(__name__)

TOKEN_HEADER = "authorization"
RANK_HEADER = "x-decentlam-rank"


def read_token_file(path: str | Path) -> str:
    """The bearer token stored in ``path`` (surrounding whitespace stripped).

    Raises:
        ValueError: the file is empty.
    """
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def call_metadata(token: str | None, rank: int) -> tuple[tuple[str, str], ...]:
    """Metadata every outgoing request carries."""
    metadata = [(RANK_HEADER, str(rank))]
    if token is not None:
        metadata.append((TOKEN_HEADER, f"Bearer {token}"))
    return tuple(metadata)


def caller_rank(metadata: Iterable[tuple[str, Any]] | None) -> int | None:
    """The caller's rank from request metadata, or None when absent or not an integer."""
    for key, value in metadata or ():
        if key == RANK_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


class ReadPolicy:
    """Who may read what from the peer ``rank``.

    Args:
        rank: the serving peer.
        world_size: peers of the run are ranks ``0 .. world_size - 1``.
        topology: the run's topology (its out-neighbours over a period may read); ``None`` (explicit
            weights everywhere) lets any peer of the run read every vector.
    """

    def __init__(self, rank: int, world_size: int, topology: TopologyLike | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.readers: frozenset[int] | None = None
        if topology is not None:
            readers = neighbors_over_period(topology, rank, incoming=False, outgoing=True)
            self.readers = frozenset(readers)

    def is_peer(self, rank: int | None) -> bool:
        """Whether ``rank`` belongs to the run."""
        return rank is not None and 0 <= rank < self.world_size

    def may_read(self, rank: int, name: str) -> bool:
        """Whether peer ``rank`` may fetch the vector ``name``."""
        if not self.is_peer(rank):
            return False
        if self.readers is None or name.startswith(GLOBAL_PREFIX):
            return True
        return rank in self.readers


def _denying_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with ``code``."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token and that the caller is a peer of the run.

    Args:
        token: the expected token; ``None`` disables the token check (rank is still checked).
        policy: decides which ranks belong to the run.
    """

    def __init__(self, token: str | None, policy: ReadPolicy) -> None:
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: let gRPC answer UNIMPLEMENTED
        metadata = tuple(handler_call_details.invocation_metadata or ())
        if self._expected is not None:
            presented = next((str(v) for k, v in metadata if k == TOKEN_HEADER), "")
            if not hmac.compare_digest(presented.encode(), self._expected):
                logger.warning("rejected %s: bad or missing token", handler_call_details.method)
                return _denying_handler(
                    handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
                )
        rank = caller_rank(metadata)
        if not self._policy.is_peer(rank):
            logger.warning("rejected %s from unknown rank %r", handler_call_details.method, rank)
            return _denying_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller rank {rank!r} is not a peer of this run "
                f"(0..{self._policy.world_size - 1})",
            )
        return handler


@dataclass(frozen=True)
class TlsConfig:
    """TLS material of one peer (PEM files).

    Attributes:
        cert_path: this peer's certificate (served to clients; presented as client cert under
            mutual TLS).
        key_path: its private key.
        ca_path: CA bundle that signed the peers' certificates.
        mutual: require and verify client certificates (mTLS).
        server_name_override: host name to verify in server certificates instead of the
            address host (for certificates issued to a name while dialling an IP).
    """

    cert_path: str
    key_path: str
    ca_path: str
    mutual: bool = False
    server_name_override: str | None = None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server-side credentials; requires client certificates when ``tls.mutual``."""
    key = Path(tls.key_path).read_bytes()
    cert = Path(tls.cert_path).read_bytes()
    ca = Path(tls.ca_path).read_bytes()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=tls.mutual
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Client-side credentials; presents this peer's certificate when ``tls.mutual``."""
    ca = Path(tls.ca_path).read_bytes()
    if not tls.mutual:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=Path(tls.key_path).read_bytes(),
        certificate_chain=Path(tls.cert_path).read_bytes(),
    )
