"""Bearer token, caller rank, read permissions, TLS and mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
import torch

from peer.errors import AuthError, ExchangeError
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2_grpc
from peer.transport.grpc.security import TlsConfig, call_metadata, read_token_file
from tests.conftest import GrpcPeers, ShiftTopology

TOKEN = "s3cret-token"


def start_pair(token_a: str | None, token_b: str | None) -> tuple[GrpcCommunicator, ...]:
    a = GrpcCommunicator.start(0, {}, world_size=2, config=ExchangeConfig(token=token_a))
    b = GrpcCommunicator.start(1, {0: a.address}, config=ExchangeConfig(token=token_b))
    a.update_peers({1: b.address})
    return a, b


@pytest.mark.parametrize("client_token", ["wrong", None])
def test_bad_or_missing_token_is_unauthenticated(client_token: str | None) -> None:
    a, b = start_pair(client_token, TOKEN)
    try:
        b.publish("p", torch.ones(3), 0)
        with pytest.raises(AuthError, match="UNAUTHENTICATED"):
            a.fetch(1, "p", 0, like=torch.empty(3), timeout=5)
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            a.wait_for_neighbors(2)
    finally:
        a.close()
        b.close()


def test_right_token_is_accepted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token = read_token_file(token_file)
    a, b = start_pair(token, token)
    try:
        b.publish("p", torch.ones(3), 0)
        assert torch.equal(a.fetch(1, "p", 0, like=torch.empty(3), timeout=5)[1], torch.ones(3))
    finally:
        a.close()
        b.close()


def raw_stub(address: str) -> tuple[grpc.Channel, peer_pb2_grpc.PeerStub]:
    channel = grpc.insecure_channel(address)
    return channel, peer_pb2_grpc.PeerStub(channel)


def test_unknown_rank_and_not_a_neighbor_are_denied(grpc_peers: GrpcPeers) -> None:
    comms = grpc_peers(3, topology=ShiftTopology(3, shifts=(1,)))  # 0 -> 1 -> 2 -> 0
    comms[0].publish("p", torch.ones(3), 0)
    comms[0].publish("global/g", torch.ones(3), 0)
    channel, stub = raw_stub(comms[0].address)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Info(pb.InfoRequest(caller_rank=9), metadata=call_metadata(None, 9), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        request = pb.FetchRequest(caller_rank=1, name="p", step=0, min_step=0)
        spoofed = list(stub.Fetch(request, metadata=call_metadata(None, 1), timeout=5))
        assert spoofed[0].header.sender_rank == 0  # rank 1 is 0's out-neighbour
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Fetch(request, metadata=call_metadata(None, 2), timeout=5))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # body/metadata mismatch
    # Peer 2 is not an out-neighbour of 0: partial averages are refused, global ones allowed.
    with pytest.raises(AuthError, match="PERMISSION_DENIED"):
        comms[2].fetch(0, "p", 0, like=torch.empty(3), timeout=5)
    assert torch.equal(
        comms[2].fetch(0, "global/g", 0, like=torch.empty(3), timeout=5)[1], torch.ones(3)
    )


def make_certificates(directory: Path) -> dict[str, Path]:
    """Throwaway CA, server and client certificates for 127.0.0.1 (cryptography package)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer_key: object, issuer_name: object, ca: bool, key: object) -> object:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name or subject)
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]

    def write(name: str, cert: object, key: object) -> None:
        pem = serialization.Encoding.PEM
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(pem))  # type: ignore[attr-defined]
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(  # type: ignore[attr-defined]
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("decentlam-test-ca", ca_key, None, True, ca_key)
    write("ca", ca_cert, ca_key)
    for name in ("peer0", "peer1", "intruder"):
        key = ec.generate_private_key(ec.SECP256R1())
        signer, signer_name = (key, None) if name == "intruder" else (ca_key, ca_cert.subject)
        write(name, issue(name, signer, signer_name, False, key), key)
    return {p.stem + p.suffix: p for p in directory.iterdir()}


def tls_for(files: dict[str, Path], name: str, mutual: bool) -> TlsConfig:
    return TlsConfig(
        str(files[f"{name}.crt"]), str(files[f"{name}.key"]), str(files["ca.crt"]), mutual
    )


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_exchange(tmp_path: Path, mutual: bool) -> None:
    files = make_certificates(tmp_path)
    configs = [ExchangeConfig(token=TOKEN, tls=tls_for(files, f"peer{r}", mutual)) for r in (0, 1)]
    a = GrpcCommunicator.start(0, {}, world_size=2, config=configs[0])
    b = GrpcCommunicator.start(1, {0: a.address}, config=configs[1])
    intruder = None
    try:
        a.update_peers({1: b.address})
        b.publish("p", torch.arange(5.0), 0)
        assert torch.equal(a.fetch(1, "p", 0, like=torch.empty(5), timeout=5)[1], torch.arange(5.0))
        if mutual:  # a self-signed client certificate is refused during the handshake
            rogue = ExchangeConfig(token=TOKEN, tls=tls_for(files, "intruder", True))
            intruder = GrpcCommunicator.start(0, {1: b.address}, world_size=2, config=rogue)
            with pytest.raises(ExchangeError):
                intruder.fetch(1, "p", 0, like=torch.empty(5), timeout=1.0)
    finally:
        for comm in (a, b, intruder):
            if comm is not None:
                comm.close()
