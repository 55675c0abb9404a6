"""TLS material for the federation listener and outbound peer channels.

Both sides re-read their files when they change, so a gateway's certificate and the federation
CA can be rotated without a restart: open connections keep the material they were made with,
new handshakes use the new files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from gateway.errors import ConfigError, Unauthenticated
from gateway.identity.certs import pem_certificate_facts

log = logging.getLogger("fedgate.tls")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    revoked_serials: frozenset[int]
    stamp: tuple[float, ...]


def _stamp(files: TlsFiles) -> tuple[float, ...]:
    paths = [files.cert, files.key, files.ca] + ([files.crl] if files.crl else [])
    try:
        return tuple(os.stat(p).st_mtime_ns for p in paths)
    except OSError:
        return ()


def _read_crl(path: Path, ca_pem: bytes) -> frozenset[int]:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem)
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise ConfigError(f"{path}: revocation list is not signed by the federation CA")
    return frozenset(entry.serial_number for entry in crl)


def read_material(files: TlsFiles) -> TlsMaterial:
    """Read and sanity-check the certificate, key, CA and optional revocation list."""
    stamp = _stamp(files)
    try:
        cert_pem, key_pem, ca_pem = (
            files.cert.read_bytes(),
            files.key.read_bytes(),
            files.ca.read_bytes(),
        )
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read: {exc.strerror}") from None
    for label, pem, marker in (
        (files.cert, cert_pem, b"-----BEGIN CERTIFICATE-----"),
        (files.ca, ca_pem, b"-----BEGIN CERTIFICATE-----"),
        (files.key, key_pem, b"PRIVATE KEY-----"),
    ):
        if marker not in pem:
            raise ConfigError(f"{label}: not a PEM file of the expected kind")
    revoked = _read_crl(files.crl, ca_pem) if files.crl else frozenset()
    return TlsMaterial(cert_pem, key_pem, ca_pem, revoked, stamp)


class ReloadingTls:
    """Holds TLS material and re-reads it when any file's modification time changes."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._material = read_material(files)
        self._checked = time.monotonic()
        # Called with the new material after a reload (the signer and verifier follow it).
        self.on_reload: list[Callable[[TlsMaterial], None]] = []

    @property
    def material(self) -> TlsMaterial:
        """The current material; read on every call, so the files are checked at most once a
        second here (a new handshake always checks them)."""
        self.refresh(force=False)
        return self._material

    def refresh(self, *, force: bool = True) -> bool:
        """Reload if the files changed; a broken new set is logged and the old one kept."""
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return False
        self._checked = now
        stamp = _stamp(self.files)
        if not stamp or stamp == self._material.stamp:
            return False
        try:
            self._material = read_material(self.files)
        except (ConfigError, ValueError) as exc:
            log.error("keeping the previous TLS material: %s", exc)
            return False
        log.info("TLS material reloaded from %s", self.files.cert.parent)
        for callback in self.on_reload:
            try:
                callback(self._material)
            except Exception as exc:  # keep serving with what we have
                log.error("after a TLS reload: %s", exc)
        return True

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate and pick up rotated files."""
        served = [self._material.stamp]

        def _config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(m.key_pem, m.cert_pem)], root_certificates=m.ca_pem
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by grpc on every new handshake. Compare with what grpc holds, not with the
            # last reload: another caller may have reloaded the files first.
            self.refresh()
            material = self._material
            if material.stamp == served[0]:
                return None
            served[0] = material.stamp
            return _config(material)

        return grpc.dynamic_ssl_server_credentials(
            _config(self._material), fetch, require_client_authentication=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        m = self.material
        return grpc.ssl_channel_credentials(
            root_certificates=m.ca_pem, private_key=m.key_pem, certificate_chain=m.cert_pem
        )


def peer_identity(context: grpc.aio.ServicerContext, revoked: frozenset[int]) -> str:
    """The calling organization, read only from its verified client certificate."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise Unauthenticated("no verified client certificate: federation calls need mutual TLS")
    try:
        # Parsed once per certificate; the revocation list is still consulted on every call.
        facts = pem_certificate_facts(bytes(pems[0]))
    except ValueError as exc:
        raise Unauthenticated(f"client certificate cannot be parsed: {exc}") from None
    org, serial = facts.organization(), facts.serial
    if serial in revoked:
        raise Unauthenticated(
            f"client certificate of organization {org!r} (serial {serial:x}) is revoked"
        )
    return org
