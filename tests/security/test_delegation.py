"""Delegation statements: who asked, bound to the sending organization's certificate."""

from __future__ import annotations

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.local import LocalFederation
from participant_sdk import Client
from tests.conftest import Pki
from tests.integration.federation import (
    delegation,
    echo_agent,
    federation_channel,
    records_agent,
    serving,
)
from tests.security.conftest import hospital_tokens


async def _submit(
    pki: Pki, fed: LocalFederation, *, cert: str, statement: str, task_id: str
) -> pb.TaskResult:
    channel = federation_channel(pki, fed.federation("hospital"), cert=cert, target_org="hospital")
    request = pb.TaskRequest(
        task_id=task_id,
        target_org="hospital",
        agent="echo",
        skill="say",
        input=dict_to_struct({}),
        delegation=statement,
    )
    try:
        return await pb_grpc.FederationStub(channel).SubmitTask(request, timeout=5)
    finally:
        await channel.close()


async def _refused(
    pki: Pki, fed: LocalFederation, *, cert: str, statement: str, task_id: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _submit(pki, fed, cert=cert, statement=statement, task_id=task_id)
    return info.value


async def test_certificate_of_b_with_a_statement_of_c_is_refused(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    async with serving(
        secure_fed.participant("hospital"), echo_agent(), token=_agent_token(secure_fed)
    ):
        error = await _refused(
            pki,
            secure_fed,
            cert="lab",
            task_id="bc-1",
            statement=delegation(pki, "insurer", "hospital", "bc-1"),
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "insurer" in (error.details() or "") and "lab" in (error.details() or "")
    (record,) = secure_fed["hospital"].audit.query(task_id="bc-1")
    assert record.kind == "rejected" and record.peer_org == "lab"


async def test_replayed_statement_is_refused(secure_fed: LocalFederation, pki: Pki) -> None:
    statement = delegation(pki, "lab", "hospital", "replay-1")
    async with serving(
        secure_fed.participant("hospital"), echo_agent(), token=_agent_token(secure_fed)
    ):
        first = await _submit(pki, secure_fed, cert="lab", statement=statement, task_id="replay-1")
        error = await _refused(pki, secure_fed, cert="lab", statement=statement, task_id="replay-1")
    assert first.state == pb.TASK_STATE_COMPLETED
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replay" in (error.details() or "")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda pki: delegation(pki, "lab", "insurer", "d-1"), "addressed to 'insurer'"),
        (lambda pki: delegation(pki, "lab", "hospital", "other-task"), "task"),
        (lambda pki: delegation(pki, "lab", "hospital", "d-1", ttl=7200), "longer than the 900 s"),
        (lambda pki: "e30.e30.", "algorithm none"),
        (lambda pki: "", "carries no delegation statement"),
    ],
    ids=["wrong-audience", "wrong-task", "too-long-lived", "garbage", "missing"],
)
async def test_bad_statements_are_refused(
    secure_fed: LocalFederation, pki: Pki, make, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    error = await _refused(pki, secure_fed, cert="lab", statement=make(pki), task_id="d-1")
    assert error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert fragment in (error.details() or "").lower()


async def test_alg_none_statement_is_refused(secure_fed: LocalFederation, pki: Pki) -> None:
    import base64
    import json

    def seg(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    genuine = delegation(pki, "lab", "hospital", "none-1")
    payload = genuine.split(".")[1]
    statement = f"{seg({'alg': 'none', 'typ': 'fedgate-delegation+jwt'})}.{payload}."
    error = await _refused(pki, secure_fed, cert="lab", statement=statement, task_id="none-1")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "none" in (error.details() or "")


async def test_purpose_in_the_statement_decides_what_is_shared(secure_fed: LocalFederation) -> None:
    """hospital shares diagnoses[].description with the insurer only for purpose=treatment."""
    token = hospital_tokens(secure_fed).issue("records-service", agents=["records"])
    async with (
        serving(secure_fed.participant("hospital"), records_agent(), token=token),
        Client(secure_fed.participant("insurer"), requester="adjuster-1") as client,
    ):
        plain = await client.call("hospital/records.summary", {}, timeout=10, task_id="p-1")
        treating = await client.call(
            "hospital/records.summary",
            {},
            timeout=10,
            task_id="p-2",
            purpose="treatment",
            roles=("physician",),
        )
    assert plain.output["diagnoses"] == [{"code": "J45"}]
    assert treating.output["diagnoses"] == [{"code": "J45", "description": "asthma, mild"}]
    (received,) = secure_fed["hospital"].audit.query(task_id="p-2", kind="request_received")
    assert received.requester == "adjuster-1"
    assert received.detail == "purpose=treatment roles=physician"


def _agent_token(fed: LocalFederation) -> str:
    return hospital_tokens(fed).issue("echo-service", agents=["echo"])
