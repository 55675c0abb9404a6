"""TLS material for the federation listener and outbound peer channels.

Both sides re-read their files when they change, so a gateway's certificate and the federation
CA can be rotated without a restart: open connections keep the material they were made with,
new handshakes use the new files.

The gateway's own certificate is checked whenever it is read: that its key is the one in the key
file, that it names this gateway's organization, that it is valid now, and that it chains to a
CA in the CA file. A gateway that trusts one CA while holding a certificate of another would
start, and fail only at its partners' handshakes; it refuses to start instead, and a rotated
set that fails the check is refused and the previous one keeps serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from gateway.errors import ConfigError, FedgateError, Unauthenticated
from gateway.identity.certs import organization_of, pem_certificate_facts

log = logging.getLogger("fedgate.tls")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    # The organization the certificate must name (the gateway's own); None: not checked.
    org: str | None = None


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
    check_own_certificate(files, cert_pem, key_pem, ca_pem)
    revoked = _read_crl(files.crl, ca_pem) if files.crl else frozenset()
    return TlsMaterial(cert_pem, key_pem, ca_pem, revoked, stamp)


def check_own_certificate(files: TlsFiles, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
    """ConfigError, in one line with the fix, unless the certificate is usable by this gateway:
    its key, its organization, valid now, and issued (through any intermediates in the
    certificate file) by a CA of the CA file."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{files.cert}: not a PEM certificate: {exc}") from None
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"{files.ca}: not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"{files.key}: the key is encrypted, and grpc needs it unencrypted: keep an "
            "unencrypted copy readable by the gateway's user alone (chmod 600)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{files.key}: not a PEM private key: {exc}") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise ConfigError(
            f"{files.key}: this key is not the key of the certificate in {files.cert}: use the "
            "key made with the certificate's request (`fedgate certs request` writes both)"
        )
    if files.org is not None:
        try:
            named = organization_of(leaf)
        except FedgateError as exc:
            raise ConfigError(f"{files.cert}: {exc.message}") from None
        if named != files.org:
            raise ConfigError(
                f"{files.cert}: the certificate names organization {named!r}, but this gateway "
                f"is {files.org!r} ([gateway] org): use a certificate issued to {files.org}"
            )
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc <= now:
        raise ConfigError(
            f"{files.cert}: this gateway's certificate expired on "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: get a new one from the federation "
            "CA (`fedgate certs request`, then its operator's `fedgate certs issue --csr`)"
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigError(
            f"{files.cert}: this gateway's certificate is valid only from "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this host's clock"
        )
    if _chains_to(leaf, chain[1:], cas) is None:
        trusted = "; ".join(ca.subject.rfc4514_string() for ca in cas) or "no certificate"
        raise ConfigError(
            f"{files.cert}: this gateway's certificate (issuer "
            f"{leaf.issuer.rfc4514_string()!r}) is not issued by the CA in {files.ca} "
            f"({trusted}), so partners that trust that CA refuse it: put the federation's CA "
            "certificate in [federation] ca, or get this gateway's certificate from that CA "
            "(`fedgate certs request`)"
        )


def _chains_to(
    cert: x509.Certificate, intermediates: list[x509.Certificate], cas: list[x509.Certificate]
) -> x509.Certificate | None:
    """The CA of `cas` that issued `cert`, directly or through `intermediates`, or None."""
    current = cert
    for _ in range(len(intermediates) + 1):
        for ca in cas:
            if _issued_by(current, ca):
                return ca
        parent = next((c for c in intermediates if _issued_by(current, c)), None)
        if parent is None:
            return None
        current = parent
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


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

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Server credentials that pick up rotated files and, by default, require a client
        certificate of the CA (the federation listener; the participant listener's TLS does
        not: its callers hold tokens)."""
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
            _config(self._material), fetch, require_client_authentication=require_client_auth
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
