"""TLS at both public doors, with certificates made in the test: a client that trusts the CA gets through,
a plain-text client does not, and with a client CA configured a client without a certificate from it is
refused. The HTTP door is uvicorn built by herd.platform.server.http_config, as `herd serve` builds it."""

from __future__ import annotations

import asyncio
import ssl

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herd.platform.gateway.grpc_server import start_grpc
from herd.platform.gateway.http_app import create_app
from herd.platform.server import _announce, http_config
from herd.platform.settings import HerdSettings, TlsSettings
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.certs import CertAuthority
from tests.waiting import until


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(directory)
    other = CertAuthority(directory, "other-ca")
    return {"ca": ca, "server": ca.issue("gateway"), "client": ca.issue("client", ips=(), dns=()),
            "intruder": other.issue("intruder", ips=(), dns=())}


# --- gRPC ------------------------------------------------------------------------------------------


def _grpc(gateway, pki, body, *, client_ca: bool = False):
    async def main():
        server, port = await start_grpc(gateway, port=0, cert_chain=pki["server"].cert,
                                        private_key=pki["server"].key,
                                        client_ca=pki["ca"].pem.cert if client_ca else None)
        try:
            return await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    return asyncio.run(main())


def _credentials(pki, client: str | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca"].pem.cert)
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"].pem.cert, private_key=pki[client].key,
                                        certificate_chain=pki[client].cert)


async def _list_models(target: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
               else grpc.aio.insecure_channel(target))
    async with channel:
        answer = await pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        return [m.id for m in answer.models]


async def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list_models(target, credentials)
    return info.value.code()


def test_grpc_door_with_tls_serves_tls_clients_only(gateway, pki):
    async def body(target):
        models = await _list_models(target, _credentials(pki, None))
        async with grpc.aio.secure_channel(target, _credentials(pki, None)) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="herd.v1.Inference"), timeout=10)
        return models, health.status, await _refused(target, None)

    models, health, plain = _grpc(gateway, pki, body)
    assert models == ["scout"]
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert plain == grpc.StatusCode.UNAVAILABLE


def test_grpc_door_with_a_client_ca_refuses_clients_without_its_certificate(gateway, pki):
    async def body(target):
        return (await _list_models(target, _credentials(pki, "client")),
                await _refused(target, _credentials(pki, None)),
                await _refused(target, _credentials(pki, "intruder")))

    models, no_cert, other_ca = _grpc(gateway, pki, body, client_ca=True)
    assert models == ["scout"]
    assert no_cert == other_ca == grpc.StatusCode.UNAVAILABLE


def test_grpc_door_needs_a_certificate_and_its_key_together(gateway, pki):
    with pytest.raises(ValueError, match="both a certificate chain and its private key"):
        asyncio.run(start_grpc(gateway, port=0, cert_chain=pki["server"].cert))


# --- HTTP ------------------------------------------------------------------------------------------


def _settings(pki, *, client_ca: bool = False) -> HerdSettings:
    tls = TlsSettings(cert_file=pki["server"].cert_file, key_file=pki["server"].key_file,
                      client_ca_file=pki["ca"].cert_file if client_ca else None)
    return HerdSettings(http_port=0, tls=tls)


def _https(settings, gateway, body):
    async def main():
        server = uvicorn.Server(http_config(create_app(gateway), settings))
        task = asyncio.create_task(server.serve())
        try:
            await until(lambda: server.started or task.done(), timeout_s=30)  # uvicorn has no event for it
            if task.done():
                task.result()  # why it stopped
            assert server.started, "uvicorn did not start within 30 s"
            return await body(server.servers[0].sockets[0].getsockname()[1])
        finally:
            server.should_exit = True
            await task

    return asyncio.run(main())


def _context(pki, client: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
    if client is not None:
        context.load_cert_chain(pki[client].cert_file, pki[client].key_file)
    return context


async def _get_models(url: str, verify: ssl.SSLContext | bool = True) -> list[str]:
    async with httpx.AsyncClient(verify=verify, timeout=10) as client:
        response = await client.get(f"{url}/v1/models")
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]


async def _fails(url: str, verify: ssl.SSLContext | bool = True) -> type[Exception]:
    with pytest.raises(httpx.TransportError) as info:
        await _get_models(url, verify)
    return info.type


def test_http_door_with_tls_serves_https_only(gateway, pki):
    async def body(port):
        return (await _get_models(f"https://127.0.0.1:{port}", _context(pki)),
                await _fails(f"http://127.0.0.1:{port}"),
                await _fails(f"https://127.0.0.1:{port}", ssl.create_default_context()))  # the CA not trusted

    models, plain, untrusted = _https(_settings(pki), gateway, body)
    assert models == ["scout"]
    assert issubclass(plain, httpx.TransportError) and issubclass(untrusted, httpx.ConnectError)


def test_http_door_with_a_client_ca_refuses_clients_without_its_certificate(gateway, pki):
    async def body(port):
        url = f"https://127.0.0.1:{port}"
        return (await _get_models(url, _context(pki, "client")), await _fails(url, _context(pki)),
                await _fails(url, _context(pki, "intruder")))

    models, no_cert, other_ca = _https(_settings(pki, client_ca=True), gateway, body)
    assert models == ["scout"]
    assert issubclass(no_cert, httpx.TransportError) and issubclass(other_ca, httpx.TransportError)


def test_http_config_is_plain_without_certificates(pki):
    plain = http_config(None, HerdSettings(http_port=0))
    assert plain.ssl_certfile is None and plain.ssl_ca_certs is None
    mutual = http_config(None, _settings(pki, client_ca=True))
    assert (mutual.ssl_certfile, mutual.ssl_cert_reqs) == (str(pki["server"].cert_file), ssl.CERT_REQUIRED)


def test_the_banner_says_https_and_tls(pki, capsys):
    settings = _settings(pki, client_ca=True)
    _announce(settings, 8443, 50443, None)
    out = capsys.readouterr().out
    assert "OpenAI HTTP: https://127.0.0.1:8443/v1" in out
    assert "127.0.0.1:50443 (TLS, client certificates required, reflection on)" in out
    assert "curl -s https://127.0.0.1:8443/v1/chat/completions --cert <client.crt>" in out
    _announce(HerdSettings(), 8000, 50051, None)
    assert "http://127.0.0.1:8000/v1" in capsys.readouterr().out
