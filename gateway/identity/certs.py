"""Certificates: the federation CA, gateway certificates and reading a peer's organization.

Identity rule: a gateway certificate names its organization in the subject's Organization (O)
attribute, and carries the DNS name `<org>.fedgate` in its subjectAltName. The federation
listener takes the peer organization from O of the verified client certificate (and requires the
SAN to agree); a gateway dialing a peer verifies the server as `<org>.fedgate`, so only the
certificate of that organization is accepted on the other end.

Keys are ECDSA P-256: fast handshakes, and the same keys sign receipts and checkpoints.

Two kinds of CA. A development CA (`fedgate init`, `fedgate certs dev`, the demo) says so in its
subject (OU "INSECURE DEVELOPMENT CERTIFICATE") and keeps its key unencrypted: for a trial on one
machine. A federation CA (`fedgate certs ca`) is the real thing: its key is encrypted with a
passphrase, it issues only end-entity certificates (pathLenConstraint 0), for the validity its
operator chooses, and it signs gateways' certificate requests (`fedgate certs request` makes the
key and the request on the gateway's host; the key never leaves it).

Reading a certificate (its names, extensions and key) costs about half a signature check, and
the same few peer certificates come back on every exchange, so what identity checks read from a
certificate is parsed once per DER (`certificate_facts`). Only what the bytes alone decide is
kept: whether a trusted CA issued it, whether it is valid at the time that matters and whether it
is revoked are decided by the caller on every use.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError, FedgateError, PermissionDenied, Unauthenticated

SAN_SUFFIX = ".fedgate"
DEV_WARNING = "INSECURE DEVELOPMENT CERTIFICATE - local use only"


def org_dns_name(org: str) -> str:
    """The DNS name a gateway certificate of `org` carries and a client verifies."""
    return f"{org}{SAN_SUFFIX}"


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    name: str = "Fedgate development federation CA",
    *,
    days: int = 3650,
    not_before: dt.datetime | None = None,
    development: bool = True,
) -> IssuedCert:
    """A self-signed CA certificate and (unencrypted) key for a federation.

    A development CA names itself as one (OU `DEV_WARNING`); `development=False` is for
    `fedgate certs ca`, whose caller encrypts the key (`encrypt_key`).
    """
    key = _new_key()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if development:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, DEV_WARNING))
    subject = x509.Name(attributes)
    start = not_before or _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_gateway_cert(
    ca: IssuedCert,
    org: str,
    *,
    days: int = 825,
    not_before: dt.datetime | None = None,
    extra_dns: tuple[str, ...] = ("localhost",),
    san_org: str | None = None,
    names: tuple[str, ...] | None = None,
) -> IssuedCert:
    """A new key and a gateway certificate for `org`, usable as TLS server and client, signed
    by `ca`. Besides `<org>.fedgate` it names `names` (DNS names or IP addresses) when given,
    else `extra_dns` and 127.0.0.1 (a development set's habit).

    `san_org` exists for tests that need a certificate whose SAN disagrees with its O.
    """
    key = _new_key()
    if names is None:
        names = (*extra_dns, "127.0.0.1")
    cert_pem = _gateway_cert(
        ca, org, key.public_key(), days=days, not_before=not_before, names=names, san_org=san_org
    )
    return IssuedCert(cert_pem, _key_pem(key))


def _gateway_cert(
    ca: IssuedCert,
    org: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    days: int,
    not_before: dt.datetime | None = None,
    names: tuple[str, ...] = (),
    san_org: str | None = None,
) -> bytes:
    """The certificate (PEM) of a gateway of `org` for `public_key`; `names` are further DNS
    names or IP addresses the listener is reached by."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    start = not_before or _now() - dt.timedelta(minutes=5)
    general: list[x509.GeneralName] = [x509.DNSName(org_dns_name(san_org or org))]
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                    x509.NameAttribute(NameOID.COMMON_NAME, org_dns_name(org)),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def is_development_ca(ca_pem: bytes) -> bool:
    """Whether a CA certificate names itself a development CA (OU `DEV_WARNING`)."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    units = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return any(unit.value == DEV_WARNING for unit in units)


def certificate_request(org: str) -> IssuedCert:
    """A new gateway key and a certificate signing request (PEM) for `org`: `fedgate certs
    request`. The request goes to the federation CA's operator; the key stays here.

    Returned as IssuedCert(cert_pem=the request, key_pem=the key).
    """
    key = _new_key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                    x509.NameAttribute(NameOID.COMMON_NAME, org_dns_name(org)),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(org_dns_name(org))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return IssuedCert(request.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_from_request(
    ca: IssuedCert,
    request_pem: bytes,
    org: str,
    *,
    days: int = 397,
    names: tuple[str, ...] = (),
) -> bytes:
    """The certificate (PEM) for a gateway's signing request, as the federation CA issues it.

    The CA decides what the certificate says (`org`, `<org>.fedgate`, `names`, the validity);
    from the request it takes only the public key, after checking the request's signature and
    that the organization it names, if any, is `org`. Raises ConfigError naming the problem.
    """
    try:
        request = x509.load_pem_x509_csr(request_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate signing request: {exc}") from None
    if not request.is_signature_valid:
        raise ConfigError("the request's signature does not verify: ask for a new request")
    named = [
        str(a.value) for a in request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    ]
    if named and named != [org]:
        raise ConfigError(
            f"the request names organization {named[0]!r}, not {org!r}: issue it with --org "
            f"{named[0]} if that is who asked, or ask {org} for its own request"
        )
    key = request.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            "the request's key is not ECDSA P-256 (gateway keys sign receipts and delegation "
            "statements with ES256): make the request with `fedgate certs request`"
        )
    return _gateway_cert(ca, org, key, days=days, names=names)


def encrypt_key(key_pem: bytes, passphrase: bytes) -> bytes:
    """An unencrypted PEM private key, encrypted with `passphrase` (PKCS#8, best available)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def key_is_encrypted(key_pem: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_pem or b"Proc-Type: 4,ENCRYPTED" in (
        key_pem
    )


def load_ca(
    cert_path: Path,
    key_path: Path,
    passphrase: Callable[[], bytes],
    *,
    missing: str = "create a federation CA first with `fedgate certs ca`",
) -> IssuedCert:
    """A CA's certificate and key, the key decrypted in memory (`passphrase` is asked for only
    when the key is encrypted). ConfigError names a missing file (with `missing`, the fix), a
    wrong passphrase or a key that is not the certificate's."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc.filename}: not found: {missing}") from None
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read: {exc.strerror}") from None
    password = passphrase() if key_is_encrypted(key_pem) else None
    try:
        key = serialization.load_pem_private_key(key_pem, password=password)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{key_path}: cannot decrypt the CA key: wrong passphrase"
            if password is not None
            else f"{key_path}: not a PEM private key"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_path}: not a PEM certificate") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path}: this key is not the key of the CA in {cert_path}")
    return IssuedCert(cert_pem, _key_pem(key))


def write_pair(issued: IssuedCert, cert_path: Path, key_path: Path) -> None:
    """Write a certificate and its key; the key file is readable by its owner only."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(issued.cert_pem)
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(issued.key_pem)


def organization_of(cert: x509.Certificate) -> str:
    """The organization a verified gateway certificate names (O, which the SAN must agree with)."""
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(orgs) != 1 or not isinstance(orgs[0].value, str) or not orgs[0].value:
        raise Unauthenticated(
            "client certificate names no single organization (subject O): reissue it with "
            "`fedgate certs issue`"
        )
    org = orgs[0].value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = set()
    if org_dns_name(org) not in dns_names:
        raise PermissionDenied(
            f"client certificate names organization {org!r} but its subjectAltName lacks "
            f"{org_dns_name(org)!r}: reissue it with `fedgate certs issue`"
        )
    return org


@dataclass(frozen=True)
class CertificateFacts:
    """What identity checks read from one certificate; see `certificate_facts`."""

    certificate: x509.Certificate
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    # None when the key is not ECDSA: such a certificate signs nothing we accept.
    public_key: ec.EllipticCurvePublicKey | None
    # The organization, or the error organization_of raised (kept as class and message, so every
    # use raises a fresh exception).
    named_org: str | None
    org_refusal: tuple[type[FedgateError], str] | None

    def organization(self) -> str:
        """The organization the certificate names (see organization_of), or its refusal."""
        if self.org_refusal is not None:
            error, message = self.org_refusal
            raise error(message)
        assert self.named_org is not None
        return self.named_org


def _facts(cert: x509.Certificate) -> CertificateFacts:
    try:
        named_org: str | None = organization_of(cert)
        refusal = None
    except FedgateError as exc:
        named_org, refusal = None, (type(exc), exc.message)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    key = cert.public_key()
    return CertificateFacts(
        certificate=cert,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        public_key=key if isinstance(key, ec.EllipticCurvePublicKey) else None,
        named_org=named_org,
        org_refusal=refusal,
    )


@functools.lru_cache(maxsize=1024)
def certificate_facts(der: bytes) -> CertificateFacts:
    """The facts of a DER certificate, parsed once per distinct bytes; ValueError if malformed.

    Bounded (least recently used first out): a flood of distinct certificates only costs
    re-parsing, never a wrong answer, since every fact depends on the bytes alone.
    """
    return _facts(x509.load_der_x509_certificate(der))


@functools.lru_cache(maxsize=256)
def pem_certificate_facts(pem: bytes) -> CertificateFacts:
    """`certificate_facts` of a PEM certificate (the form grpc gives a peer's certificate in)."""
    return _facts(x509.load_pem_x509_certificate(pem))


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("gateway keys are ECDSA P-256")
    return key


def revocation_list(ca: IssuedCert, serials: list[int], *, days: int = 30) -> bytes:
    """A CRL (PEM) signed by the federation CA that revokes the given certificate serials."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoked_serials(crl_pem: bytes) -> list[int]:
    return [entry.serial_number for entry in x509.load_pem_x509_crl(crl_pem)]
