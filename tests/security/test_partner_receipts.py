"""A partner gateway acting in bad faith answers with receipts that do not vouch for the result
(issue 11, online receipt checks): another task's receipt, a receipt with the wrong state,
or a provenance receipt signed by a certificate the federation never issued. Each is refused
(`receipt_invalid`) and the output never reaches our requester.

The partner is a federation server written from proto/ holding the insurer's real certificate
and key, so every signature it makes is genuinely the insurer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.edges.wire import result_to_pb
from gateway.exchange.tasks import TaskResult, TaskState
from gateway.identity.signing import Signer, sign_result
from gateway.local import LocalFederation
from participant_sdk import Client, TaskFailed
from tests.conftest import Pki

OUTPUT = {"approved": True, "note": "the partner's answer"}


def _insurer(pki: Pki) -> Signer:
    return Signer.from_files(pki.cert("insurer"), pki.key("insurer"))


def _receipt(signer: Signer, task_id: str, state: str = "completed") -> dict[str, object]:
    return sign_result(signer, task_id=task_id, output=OUTPUT, state=state).to_json()


class _Partner(pb_grpc.FederationServicer):
    def __init__(self, answer: Callable[[str], TaskResult]) -> None:
        self.answer = answer

    async def SubmitTask(  # type: ignore[override]
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        return result_to_pb(self.answer(request.task_id))

    async def StreamTask(  # type: ignore[override]
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        result = result_to_pb(self.answer(request.task_id))
        yield pb.TaskUpdate(task_id=request.task_id, state=result.state, result=result)


@contextlib.asynccontextmanager
async def partner(pki: Pki, answer: Callable[[str], TaskResult]) -> AsyncIterator[int]:
    cert, key = pki.pem("insurer")
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=pki.ca.read_bytes(), require_client_auth=True
    )
    server = grpc.aio.server()
    pb_grpc.add_FederationServicer_to_server(_Partner(answer), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


def _completed(task_id: str, receipt: dict[str, object], provenance: tuple = ()) -> TaskResult:
    return TaskResult(
        task_id,
        TaskState.COMPLETED,
        output=OUTPUT,
        receipt=receipt,
        responder_org="insurer",
        provenance=provenance,
    )


@pytest.mark.parametrize("forgery", ["another-task", "wrong-state", "rogue-provenance", "valid"])
async def test_a_receipt_that_does_not_vouch_for_the_result_is_refused(
    fed: LocalFederation, pki: Pki, forgery: str
) -> None:
    insurer = _insurer(pki)
    rogue = Signer.from_files(pki.cert("rogue-insurer"), pki.key("rogue-insurer"))

    def answer(task_id: str) -> TaskResult:
        if forgery == "another-task":
            return _completed(task_id, _receipt(insurer, "some-other-task"))
        if forgery == "wrong-state":
            return _completed(task_id, _receipt(insurer, task_id, state="input-required"))
        if forgery == "rogue-provenance":
            forged = sign_result(rogue, task_id="sub-1", output={"x": 1}).provenance_json()
            return _completed(task_id, _receipt(insurer, task_id), provenance=(forged,))
        return _completed(task_id, _receipt(insurer, task_id))

    hospital = fed["hospital"]
    async with partner(pki, answer) as port, Client(fed.participant("hospital")) as client:
        real = hospital.peers.address("insurer")
        hospital.peers.set_address("insurer", f"127.0.0.1:{port}")
        try:
            if forgery == "valid":
                result = await client.call("insurer/echo.say", {}, timeout=10, task_id="r-ok")
                assert result.output == OUTPUT
                return
            with pytest.raises(TaskFailed) as info:
                await client.call("insurer/echo.say", {}, timeout=10, task_id=f"r-{forgery}")
        finally:
            hospital.peers.set_address("insurer", real)
    failed = info.value.result
    assert failed.error is not None and failed.error.code == "receipt_invalid"
    assert failed.output == {}, "nothing of the refused result reaches our requester"
    (record,) = hospital.audit.query(task_id=f"r-{forgery}", kind="failed")
    assert record.decision == "receipt_invalid"


async def test_a_resume_of_a_task_never_received_is_not_found_and_recorded(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """A requesting gateway that restarted asks again without the input (`resume`): for a task
    the responder never got, it answers NOT_FOUND naming the fix, and records the refusal."""
    from tests.security.raw import federation_client, refusal, task_request

    async with federation_client(pki, secure_fed, "lab") as lab:
        request = task_request(pki, "lab", "never-1", idempotency_key="k-never", resume=True)
        error = await refusal(lab.SubmitTask(request, timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "is not known to the gateway of 'hospital': send it again with its input" in (
        error.details() or ""
    )
    (record,) = secure_fed["hospital"].audit.query(task_id="never-1")
    assert record.kind == "rejected" and record.status == "NOT_FOUND"
