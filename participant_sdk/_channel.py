"""The channel to the local gateway's participant listener: plaintext on loopback, or TLS."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

TlsCa = str | os.PathLike[str] | bytes | None


def ca_pem(tls_ca: TlsCa) -> bytes | None:
    """The PEM of the CA that issued the gateway's participant certificate, or None (no TLS).

    `tls_ca` is that PEM itself (bytes) or the path of a file holding it; read once, here, so a
    missing file fails where the Client or worker is made, not at its first call.
    """
    if tls_ca is None:
        return None
    if isinstance(tls_ca, bytes):
        return tls_ca
    return Path(tls_ca).read_bytes()


def open_channel(gateway: str, root_pem: bytes | None) -> grpc.aio.Channel:
    """A channel to `gateway`: TLS verified against `root_pem` when given, else plaintext."""
    if root_pem is None:
        return grpc.aio.insecure_channel(gateway)
    return grpc.aio.secure_channel(
        gateway, grpc.ssl_channel_credentials(root_certificates=root_pem)
    )
