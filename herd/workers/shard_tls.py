"""Mutual TLS between a trunk and its expert shards: the PEM files both sides read, and their gRPC credentials."""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field


class ShardTls(BaseModel):
    """Both sides present `cert_file` (so it must allow server and client use) and trust only `ca_file`. The
    trunk checks `server_name` in a shard's certificate, or the shard's address when it is None."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: str = Field(description="the certificate every shard and the trunk present (PEM)")
    key_file: str = Field(description="its private key (PEM)")
    ca_file: str = Field(description="the CA a peer's certificate must be signed by (PEM)")
    server_name: str | None = Field(None, description="the name checked in a shard's certificate (null: its address)")

    @classmethod
    def of(cls, cert_file: str | Path | None, key_file: str | Path | None, ca_file: str | Path | None,
           server_name: str | None = None) -> ShardTls | None:
        """All three files (TLS) or none (plain text, None); ValueError naming what is missing."""
        given = {"cert": cert_file, "key": key_file, "ca": ca_file}
        if all(v is None for v in given.values()):
            return None
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"shard TLS needs a certificate, its key and the CA; {', '.join(missing)} missing")
        return cls(cert_file=str(cert_file), key_file=str(key_file), ca_file=str(ca_file), server_name=server_name)

    def server_credentials(self) -> grpc.ServerCredentials:
        """A shard's side: its certificate, and a client certificate from the CA required."""
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The trunk's side: the shard's certificate checked against the CA; the trunk's own presented."""
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for what, path in (("certificate", self.cert_file), ("key", self.key_file), ("CA", self.ca_file)):
            try:
                out.append(Path(path).read_bytes())
            except OSError as err:
                raise ValueError(f"shard TLS: cannot read the {what} {path}: {err.strerror or err}") from None
        return out[0], out[1], out[2]


def check_shard_listen(listen: str, tls: ShardTls | None) -> None:
    """Shards listen on loopback (beside their trunk), or on the node's address only with mutual TLS: anyone
    on the network could otherwise compute on them and read what they send. ValueError saying so."""
    if listen not in ("loopback", "node"):
        raise ValueError(f"shard_listen must be 'loopback' or 'node', got {listen!r}")
    if listen == "node" and tls is None:
        raise ValueError("shard_listen 'node' puts the expert shards on the node's network address, which needs "
                         "shard_tls (mutual TLS between the trunk and its shards); set shard_tls, or shard_listen "
                         "'loopback' with every shard on its trunk's node (placement_strategy STRICT_PACK)")
