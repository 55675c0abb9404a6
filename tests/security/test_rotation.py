"""Rotating the gateway's own certificate and the federation's trust material without a restart."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509

from gateway.identity.certs import create_ca, issue_gateway_cert, write_pair
from gateway.local import LocalFederation
from participant_sdk import Client
from tests.conftest import Pki, ca_pair
from tests.integration.federation import configs, serving, slow_agent


def _server_serial(address: str, client_cert: Path, client_key: Path, ca: Path) -> int:
    """The serial of the certificate the gateway presents on a new handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(client_cert), str(client_key))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _touch(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


async def test_own_certificate_rotates_while_streams_keep_working(tmp_path: Path, pki: Pki) -> None:
    own = tmp_path / "own"
    own.mkdir()
    cert, key = own / "hospital.crt", own / "hospital.key"
    cert.write_bytes(pki.cert("hospital").read_bytes())
    key.write_bytes(pki.key("hospital").read_bytes())
    paths = configs(tmp_path, pki)
    paths[0].write_text(
        paths[0]
        .read_text()
        .replace(str(pki.cert("hospital")), str(cert))
        .replace(str(pki.key("hospital")), str(key))
    )
    async with (
        LocalFederation(paths) as fed,
        serving(fed.participant("hospital"), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        address = fed.federation("hospital")
        before = await asyncio.to_thread(
            _server_serial, address, pki.cert("insurer"), pki.key("insurer"), pki.ca
        )
        in_flight = asyncio.ensure_future(
            client.call("hospital/slow.wait", {"seconds": 1}, timeout=20)
        )
        await asyncio.sleep(0.3)
        write_pair(issue_gateway_cert(ca_pair(pki), "hospital"), cert, key)
        _touch(cert)
        after = await asyncio.to_thread(
            _server_serial, address, pki.cert("insurer"), pki.key("insurer"), pki.ca
        )
        assert after != before, "a new handshake gets the new certificate"
        assert (await in_flight).output == {"waited": 1}, "the open stream kept working"
        again = await client.call("hospital/slow.wait", {"seconds": 0}, timeout=20)
        assert again.ok, "receipts signed with the new key verify"


async def test_trust_material_rotates_to_a_new_federation_ca(tmp_path: Path, pki: Pki) -> None:
    """hospital adds a new CA to its trust file; insurer, reissued by the new CA, gets in."""
    new_ca = create_ca("Federation CA 2027")
    insurer_dir = tmp_path / "insurer-certs"
    write_pair(
        issue_gateway_cert(new_ca, "insurer"),
        insurer_dir / "insurer.crt",
        insurer_dir / "insurer.key",
    )
    both = tmp_path / "both-cas.crt"
    both.write_bytes(pki.ca.read_bytes() + new_ca.cert_pem)
    trust = tmp_path / "hospital-trust.crt"
    trust.write_bytes(pki.ca.read_bytes())
    paths = configs(tmp_path, pki)
    paths[0].write_text(paths[0].read_text().replace(f'ca = "{pki.ca}"', f'ca = "{trust}"'))
    paths[1].write_text(
        paths[1]
        .read_text()
        .replace(str(pki.cert("insurer")), str(insurer_dir / "insurer.crt"))
        .replace(str(pki.key("insurer")), str(insurer_dir / "insurer.key"))
        .replace(f'ca = "{pki.ca}"', f'ca = "{both}"')
    )
    async with (
        LocalFederation(paths) as fed,
        serving(fed.participant("hospital"), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        from participant_sdk import Unavailable

        try:
            await client.call("hospital/slow.wait", {"seconds": 0}, timeout=3, retry=None)
            refused = False
        except Unavailable:
            refused = True
        assert refused, "before the rotation hospital does not trust the new CA"
        trust.write_bytes(pki.ca.read_bytes() + new_ca.cert_pem)
        _touch(trust)
        fed["insurer"].peers.health["hospital"].circuit = "closed"
        # The insurer's channel is in its (short) reconnect backoff after the refused handshake.
        await asyncio.sleep(1.0)
        result = await client.call("hospital/slow.wait", {"seconds": 0}, timeout=10)
        assert result.ok and result.receipt is not None
