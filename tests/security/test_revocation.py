"""A revoked peer certificate is refused (our own CRL check: grpcio does not check revocation)."""

from __future__ import annotations

import os

import grpc
import pytest
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.identity.certs import load_cert, revocation_list
from gateway.local import LocalFederation
from tests.conftest import Pki, ca_pair
from tests.integration.federation import federation_channel


async def _list_as(pki: Pki, fed: LocalFederation, cert: str) -> pb.ListAgentsResponse:
    channel = federation_channel(pki, fed.federation("hospital"), cert=cert, target_org="hospital")
    try:
        return await pb_grpc.FederationStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=5)
    finally:
        await channel.close()


def _revoke_at_hospital(fed: LocalFederation, pki: Pki, org: str) -> int:
    """Put `org`'s certificate on the hospital's CRL (a new file, as `fedgate certs revoke`
    writes it); returns its serial."""
    crl_path = fed["hospital"].config.federation.crl
    assert crl_path is not None
    serial = load_cert(pki.cert(org).read_bytes()).serial_number
    crl_path.write_bytes(revocation_list(ca_pair(pki), [serial]))
    stat = crl_path.stat()
    os.utime(crl_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    return serial


async def test_revoked_certificate_is_refused_without_restart(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    assert isinstance(await _list_as(pki, secure_fed, "lab"), pb.ListAgentsResponse)
    serial = _revoke_at_hospital(secure_fed, pki, "lab")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list_as(pki, secure_fed, "lab")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"organization 'lab' (serial {serial:x}) is revoked" in (info.value.details() or "")
    refused = [
        r for r in secure_fed["hospital"].audit.query(kind="rejected") if "revoked" in r.detail
    ]
    assert refused and refused[0].status == "UNAUTHENTICATED", "the refusal is audited"
    # insurer's certificate is not on the list and keeps working
    assert isinstance(await _list_as(pki, secure_fed, "insurer"), pb.ListAgentsResponse)


async def test_self_signed_client_certificate_fails_the_handshake(
    secure_fed: LocalFederation, pki: Pki, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from gateway.identity.certs import create_ca, issue_gateway_cert, write_pair

    own_ca = create_ca("insurer's own")
    write_pair(
        issue_gateway_cert(own_ca, "insurer"),
        pki.root / "selfmade-insurer.crt",
        pki.root / "selfmade-insurer.key",
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list_as(pki, secure_fed, "selfmade-insurer")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certs_revoke_command_extends_the_list(tmp_path, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from gateway.cli import main
    from gateway.identity.certs import revoked_serials

    crl = tmp_path / "federation.crl"
    for org in ("lab", "mallory"):
        result = CliRunner().invoke(
            main,
            [
                "certs",
                "revoke",
                "--cert",
                str(pki.cert(org)),
                "--ca-dir",
                str(pki.root),
                "--crl",
                str(crl),
            ],
        )
        assert result.exit_code == 0, result.output
    serials = {load_cert(pki.cert(o).read_bytes()).serial_number for o in ("lab", "mallory")}
    assert set(revoked_serials(crl.read_bytes())) == serials
    missing = CliRunner().invoke(
        main,
        ["certs", "revoke", "--cert", str(pki.cert("lab")), "--ca-dir", str(tmp_path / "nope")],
    )
    assert missing.exit_code == 2 and "revoking needs the federation CA" in missing.output


async def test_receipt_signed_with_a_revoked_certificate_is_refused(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """grpcio cannot show us the partner's server certificate, but every receipt names its
    signer: the requester's gateway refuses a receipt whose certificate the CRL revokes."""
    from participant_sdk import Client, RetryPolicy, TaskFailed
    from tests.integration.federation import echo_agent, serving
    from tests.security.conftest import hospital_tokens

    token = hospital_tokens(secure_fed).issue("clerk", calls=["insurer/echo.say"])
    async with (
        serving(secure_fed.participant("insurer"), echo_agent()),
        Client(
            secure_fed.participant("hospital"), token=token, retry=RetryPolicy(max_attempts=1)
        ) as client,
    ):
        before = await client.call("insurer/echo.say", {"n": 1}, timeout=10)
        assert before.receipt is not None
        serial = _revoke_at_hospital(secure_fed, pki, "insurer")
        secure_fed["hospital"].tls.refresh()
        with pytest.raises(TaskFailed, match="is revoked") as info:
            await client.call("insurer/echo.say", {"n": 2}, timeout=10, task_id="revoked-1")
    error = info.value.result.error
    assert error is not None and error.code == "receipt_invalid"
    records = secure_fed["hospital"].audit.query(task_id="revoked-1")
    assert [r.kind for r in records] == ["request_sent", "failed"]
    assert records[1].decision == "receipt_invalid" and f"serial {serial:x}" in records[1].detail
