"""An expert shard served with mutual TLS: the trunk with the shards' certificate gets the same outputs
as in-process; a trunk without a certificate, or with one from another CA, fails UNAVAILABLE (no hang)."""

from __future__ import annotations

import grpc
import pytest
import torch

from herd.engine.errors import HerdError
from herd.model.tiny import make_tiny
from herd.workers.expert_shard import serve
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.shard_experts import ShardExperts
from herd.workers.shard_tls import ShardTls
from herd.workers.transport import InProcessTransport, ShardWork
from tests.certs import CertAuthority

EXPERTS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(directory)
    # One certificate for every shard and the trunk; it names the loopback address and a service name.
    shard = ca.issue("herd-shard", ips=("127.0.0.1",), dns=("herd-expert-shard",))
    other = CertAuthority(directory, "other-ca")
    return ca, shard, other, other.issue("intruder")


@pytest.fixture(scope="module")
def shard(tmp_path_factory, pki):
    ca, cert, _other, _intruder = pki
    path = make_tiny(tmp_path_factory.mktemp("tiny"), preset="scout", seed=3)
    tls = ShardTls.of(cert.cert_file, cert.key_file, ca.cert_file)
    server, port, _service = serve(path, EXPERTS, credentials=tls.server_credentials())
    yield path, f"127.0.0.1:{port}", tls
    server.stop(0)


def _work(hidden: int) -> list[ShardWork]:
    generator = torch.Generator().manual_seed(0)
    return [ShardWork(counts=[2, 0, 3, 1], rows=torch.randn(6, hidden, generator=generator))]


@pytest.mark.parametrize("server_name", [None, "herd-expert-shard"])
def test_mutual_tls_computes_what_in_process_does(shard, server_name):
    path, address, tls = shard
    transport = GrpcTransport([address], timeout_s=10, credentials=tls.channel_credentials(), server_name=server_name)
    try:
        assert transport.shard_experts() == [tuple(EXPERTS)]
        local = InProcessTransport([ShardExperts.load(path, EXPERTS)])
        work = _work(transport.infos[0].hidden_size)
        for layer in (0, 2):
            torch.testing.assert_close(transport.run(layer, work)[0], local.run(layer, work)[0], rtol=0, atol=0)
        assert transport.healthy()
    finally:
        transport.close()


def _credentials(case, tls, pki):
    ca, _cert, other, intruder = pki
    if case == "no client certificate":
        return grpc.ssl_channel_credentials(root_certificates=ca.pem.cert)
    if case == "client certificate from another CA":
        return grpc.ssl_channel_credentials(root_certificates=ca.pem.cert, private_key=intruder.key,
                                            certificate_chain=intruder.cert)
    if case == "shard not trusted (another CA)":
        return ShardTls.of(intruder.cert_file, intruder.key_file, other.cert_file).channel_credentials()
    return None  # plain text


@pytest.mark.parametrize("case", ["no client certificate", "client certificate from another CA",
                                  "shard not trusted (another CA)", "plain text"])
def test_a_trunk_the_shard_does_not_trust_is_unavailable_not_a_hang(shard, pki, case):
    _path, address, tls = shard
    with pytest.raises(HerdError) as info:
        GrpcTransport([address], timeout_s=2, credentials=_credentials(case, tls, pki))
    assert info.value.code == "UNAVAILABLE", (case, info.value)
    assert address in str(info.value)


def test_the_certificate_must_name_the_address(shard):
    _path, address, tls = shard
    with pytest.raises(HerdError) as info:
        GrpcTransport([address], timeout_s=2, credentials=tls.channel_credentials(), server_name="someone-else")
    assert info.value.code == "UNAVAILABLE"


def test_shard_tls_is_all_three_files_or_none(tmp_path):
    assert ShardTls.of(None, None, None) is None
    with pytest.raises(ValueError, match="ca missing"):
        ShardTls.of("a.crt", "a.key", None)
    tls = ShardTls.of(tmp_path / "gone.crt", tmp_path / "gone.key", tmp_path / "ca.crt", "shard")
    assert ShardTls.model_validate(tls.model_dump()) == tls
    with pytest.raises(ValueError, match=r"cannot read the certificate .*gone\.crt"):
        tls.server_credentials()


def test_the_cli_wants_all_three_tls_flags_and_readable_files(tmp_path, capsys):
    from herd.cli import main

    base = ["expert-shard", "--model", str(tmp_path), "--experts", "0:2"]
    assert main([*base, "--tls-cert", "a.crt", "--tls-key", "a.key"]) == 2
    assert "shard TLS needs a certificate, its key and the CA; ca missing" in capsys.readouterr().err
    gone = [str(tmp_path / f) for f in ("a.crt", "a.key", "ca.crt")]
    assert main([*base, "--tls-cert", gone[0], "--tls-key", gone[1], "--tls-ca", gone[2]]) == 2
    assert "cannot read the certificate" in capsys.readouterr().err
