"""Who may talk to the federation listener: every refusal asserted, and the gateway keeps serving."""

from __future__ import annotations

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.local import LocalFederation
from participant_sdk import Client
from tests.conftest import Pki
from tests.integration.federation import delegation, echo_agent, federation_channel, serving


async def _list(
    pki: Pki, fed: LocalFederation, *, cert: str | None, ca=None
) -> pb.ListAgentsResponse:  # type: ignore[no-untyped-def]
    channel = federation_channel(
        pki, fed.federation("hospital"), cert=cert, target_org="hospital", ca=ca
    )
    try:
        return await pb_grpc.FederationStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=3)
    finally:
        await channel.close()


async def _still_serving(pki: Pki, fed: LocalFederation) -> None:
    response = await _list(pki, fed, cert="insurer")
    assert isinstance(response, pb.ListAgentsResponse)


@pytest.mark.parametrize(
    "cert",
    [None, "rogue-insurer", "expired-insurer", "future-insurer"],
    ids=["no-client-cert", "rogue-ca", "expired", "not-yet-valid"],
)
async def test_bad_client_certificate_is_refused_at_the_handshake(
    fed: LocalFederation, pki: Pki, cert: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list(pki, fed, cert=cert)
    # The TLS handshake fails: the client sees the connection refused, never a reply.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await _still_serving(pki, fed)


async def test_server_of_another_organization_is_refused_by_the_client(
    fed: LocalFederation, pki: Pki
) -> None:
    """Dialing 'insurer' but reaching hospital's gateway fails: the server must be insurer.fedgate."""
    channel = federation_channel(
        pki, fed.federation("hospital"), cert="insurer", target_org="insurer"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.FederationStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=3)
    await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_certified_organization_that_is_not_a_peer_is_permission_denied(
    fed: LocalFederation, pki: Pki
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list(pki, fed, cert="mallory")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "organization 'mallory' is not a peer of 'hospital'" in (info.value.details() or "")
    records = fed["hospital"].audit.query(peer="mallory")
    assert [r.kind for r in records] == ["rejected"]
    await _still_serving(pki, fed)


async def test_certificate_whose_san_disagrees_with_its_organization(
    fed: LocalFederation, pki: Pki
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list(pki, fed, cert="mismatch-insurer")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "subjectAltName" in (info.value.details() or "")


async def test_body_claiming_another_sender_changes_nothing(fed: LocalFederation, pki: Pki) -> None:
    """insurer's certificate, a body that says 'lab': the agent and the audit log see insurer."""
    async with serving(fed.participant("hospital"), echo_agent()):
        channel = federation_channel(
            pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
        )
        request = pb.TaskRequest(
            task_id="spoof-1",
            target_org="hospital",
            agent="echo",
            skill="say",
            input=dict_to_struct({"hello": "world"}),
            sender_org="lab",
            requester="someone@lab",
            delegation=delegation(pki, "insurer", "hospital", "spoof-1", subject="adjuster"),
        )
        result = await pb_grpc.FederationStub(channel).SubmitTask(request, timeout=5)
        await channel.close()
    assert result.state == pb.TASK_STATE_COMPLETED
    assert result.output["requester_org"] == "insurer"
    peers = {r.peer_org for r in fed["hospital"].audit.query(task_id="spoof-1")}
    assert peers == {"insurer"}


async def test_task_for_another_organization_is_not_found(fed: LocalFederation, pki: Pki) -> None:
    channel = federation_channel(
        pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
    )
    request = pb.TaskRequest(
        task_id="t-wrong-org",
        target_org="lab",
        agent="echo",
        skill="say",
        delegation=delegation(pki, "insurer", "hospital", "t-wrong-org"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.FederationStub(channel).SubmitTask(request, timeout=5)
    await channel.close()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "serves organization 'hospital', not 'lab'" in (info.value.details() or "")


async def test_participant_calls_still_work_after_refusals(fed: LocalFederation, pki: Pki) -> None:
    for cert in (None, "rogue-insurer", "mallory"):
        with pytest.raises(grpc.aio.AioRpcError):
            await _list(pki, fed, cert=cert)
    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        result = await client.call("hospital/echo.say", {"ok": True}, timeout=10)
    assert result.output["echo"] == {"ok": True}
