"""Issue 11 #1: only a final, filtered, recorded, signed result carries output (guarantee 8).

The attackers do not use our SDK: an agent written from proto/ that puts its raw output on
WORKING and INPUT_REQUIRED updates, and a partner gateway that does the same on its stream. The
requester on the other side, also a raw client, must never see that output.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from fedgate.convert import dict_to_struct, struct_to_dict
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.edges.wire import update_from_pb, update_to_pb
from gateway.exchange.tasks import TaskResult, TaskState, TaskUpdate
from gateway.local import LocalFederation
from tests.conftest import Pki
from tests.integration.federation import PATIENT
from tests.security.conftest import hospital_tokens
from tests.security.raw import bearer, participant_client

SECRETS = (b"Ada Lovelace", b"123-45-6789", b"12 Analytical Row", b"INS-99887766")


def _leak(task_id: str, state: pb.TaskState) -> pb.AgentMessage:
    """An update in `state` whose result holds the whole unfiltered record."""
    return pb.AgentMessage(
        update=pb.TaskUpdate(
            task_id=task_id,
            state=state,
            message="step",
            result=pb.TaskResult(task_id=task_id, state=state, output=dict_to_struct(PATIENT)),
        )
    )


@contextlib.asynccontextmanager
async def raw_records_agent(fed: LocalFederation, token: str) -> AsyncIterator[asyncio.Task[None]]:
    """hospital's `records` agent written from proto/: it leaks on every non-final update."""
    async with participant_client(fed, "hospital") as participant:
        call = participant.Connect(metadata=bearer(token))
        card = pb.AgentCard(name="records", skills=[pb.Skill(name="summary")])
        await call.write(pb.AgentMessage(register=pb.RegisterAgents(cards=[card])))
        assert (await call.read()).registered.agents == ["records"]

        async def serve() -> None:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                if message.WhichOneof("kind") != "task":
                    continue
                task_id = message.task.request.task_id
                await call.write(_leak(task_id, pb.TASK_STATE_WORKING))
                await call.write(_leak(task_id, pb.TASK_STATE_INPUT_REQUIRED))
                await call.write(_leak(task_id, pb.TASK_STATE_WORKING))
                final = _leak(task_id, pb.TASK_STATE_COMPLETED)
                final.update.message = ""
                await call.write(final)

        task = asyncio.ensure_future(serve())
        try:
            yield task
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            call.cancel()


async def test_a_raw_agents_output_on_non_final_updates_never_reaches_the_partner(
    secure_fed: LocalFederation,
) -> None:
    token = hospital_tokens(secure_fed).issue("records", agents=["records"])
    async with (
        raw_records_agent(secure_fed, token),
        participant_client(secure_fed, "insurer") as insurer,
    ):
        request = pb.TaskRequest(
            task_id="leak-1", target_org="hospital", agent="records", skill="summary"
        )
        updates = [u async for u in insurer.StreamTask(request, timeout=20)]
    states = [u.state for u in updates]
    # INPUT_REQUIRED ends a turn: what it carries is a result like a final one, filtered,
    # recorded and signed; the WORKING before it carries nothing, and what the agent sends
    # after it, between turns, is dropped.
    assert states[0] == pb.TASK_STATE_WORKING and states[-1] == pb.TASK_STATE_INPUT_REQUIRED
    for update in updates:
        wire = update.SerializeToString()
        assert not any(secret in wire for secret in SECRETS), update
        if update.state != pb.TASK_STATE_INPUT_REQUIRED:
            assert not struct_to_dict(update.result.output), "no output before the turn ends"
    last = updates[-1].result
    assert last.HasField("receipt"), "the turn's result is the filtered, signed one"
    assert "name" not in struct_to_dict(last.output)["patient"]
    # hospital released exactly one result, with its record.
    records = secure_fed["hospital"].audit.query(task_id="leak-1")
    assert [(r.kind, r.status) for r in records] == [
        ("request_received", "submitted"),
        ("result_released", "input-required"),
    ]


class _LeakingPartner(pb_grpc.FederationServicer):
    """'insurer' as a gateway acting in bad faith: unsigned output on every update before its
    failure (WORKING, SUBMITTED, INPUT_REQUIRED)."""

    async def StreamTask(  # type: ignore[override]
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        for state in (
            pb.TASK_STATE_WORKING,
            pb.TASK_STATE_SUBMITTED,
            pb.TASK_STATE_INPUT_REQUIRED,
            pb.TASK_STATE_WORKING,
        ):
            yield _leak(request.task_id, state).update
        yield pb.TaskUpdate(
            task_id=request.task_id,
            state=pb.TASK_STATE_FAILED,
            result=pb.TaskResult(
                task_id=request.task_id,
                state=pb.TASK_STATE_FAILED,
                error=pb.TaskError(code="skill_error", message="no"),
            ),
        )


@contextlib.asynccontextmanager
async def leaking_partner(pki: Pki) -> AsyncIterator[int]:
    """A federation server with insurer's real certificate; yields its port."""
    cert, key = pki.pem("insurer")
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=pki.ca.read_bytes(), require_client_auth=True
    )
    server = grpc.aio.server()
    pb_grpc.add_FederationServicer_to_server(_LeakingPartner(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


async def test_a_partners_output_on_non_final_updates_never_reaches_our_requester(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    token = hospital_tokens(secure_fed).issue("clerk", calls=["insurer/echo.say"])
    hospital = secure_fed["hospital"]
    async with leaking_partner(pki) as port, participant_client(secure_fed, "hospital") as ours:
        real = hospital.peers.address("insurer")
        hospital.peers.set_address("insurer", f"127.0.0.1:{port}")
        try:
            request = pb.TaskRequest(
                task_id="leak-2", target_org="insurer", agent="echo", skill="say"
            )
            call = ours.StreamTask(request, timeout=20, metadata=bearer(token))
            updates = [u async for u in call]
        finally:
            hospital.peers.set_address("insurer", real)
    states = [u.state for u in updates]
    # Its INPUT_REQUIRED ends a turn with unsigned output: refused, the task fails there.
    assert states[-1] == pb.TASK_STATE_FAILED and pb.TASK_STATE_WORKING in states
    assert updates[-1].result.error.code == "receipt_invalid"
    for update in updates:
        wire = update.SerializeToString()
        assert not any(secret in wire for secret in SECRETS), update


def test_the_wire_never_carries_a_result_on_a_non_final_update() -> None:
    """Both directions, whoever builds the update: a result rides only on a final or
    input-required (turn-ending) one."""
    result = TaskResult("t-1", TaskState.WORKING, output={"secret": 1})
    for state in (TaskState.SUBMITTED, TaskState.WORKING, TaskState.AUTH_REQUIRED):
        sent = update_to_pb(TaskUpdate("t-1", state, result=result))
        assert not sent.HasField("result")
        received = update_from_pb(
            _leak("t-1", pb.TaskState.Value(f"TASK_STATE_{state.name}")).update
        )
        assert received.result is None and received.state is state
    for state in (TaskState.COMPLETED, TaskState.INPUT_REQUIRED):
        assert update_to_pb(TaskUpdate("t-1", state, result=result)).HasField("result")


class _FailingWithOutputPartner(pb_grpc.FederationServicer):
    """'insurer' in bad faith: its final answer says FAILED (or CANCELED), which carries no
    receipt to verify, and holds the whole unfiltered record as output all the same."""

    def __init__(self, state: pb.TaskState) -> None:
        self.state = state

    def _result(self, task_id: str) -> pb.TaskResult:
        return pb.TaskResult(
            task_id=task_id,
            state=self.state,
            output=dict_to_struct(PATIENT),
            error=pb.TaskError(code="skill_error", message="no"),
        )

    async def SubmitTask(  # type: ignore[override]
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.TaskResult:
        return self._result(request.task_id)

    async def StreamTask(  # type: ignore[override]
        self, request: pb.TaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskUpdate]:
        yield pb.TaskUpdate(
            task_id=request.task_id, state=self.state, result=self._result(request.task_id)
        )


async def test_a_partners_failed_answer_never_carries_output_to_our_requester(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """A failed or canceled answer has no receipt that could sign output: whatever output a
    partner puts on it stays out of what our requester gets (unary or streamed, or asked for
    later), and out of the task table."""
    token = hospital_tokens(secure_fed).issue("clerk", calls=["insurer/echo.say"])
    hospital = secure_fed["hospital"]
    cert, key = pki.pem("insurer")
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=pki.ca.read_bytes(), require_client_auth=True
    )
    for number, state in enumerate((pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELED)):
        server = grpc.aio.server()
        pb_grpc.add_FederationServicer_to_server(_FailingWithOutputPartner(state), server)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        real = hospital.peers.address("insurer")
        hospital.peers.set_address("insurer", f"127.0.0.1:{port}")
        try:
            async with participant_client(secure_fed, "hospital") as ours:
                unary_id, stream_id = f"fail-out-{number}-u", f"fail-out-{number}-s"
                answers = [
                    await ours.SubmitTask(
                        pb.TaskRequest(
                            task_id=unary_id, target_org="insurer", agent="echo", skill="say"
                        ),
                        timeout=20,
                        metadata=bearer(token),
                    )
                ]
                call = ours.StreamTask(
                    pb.TaskRequest(
                        task_id=stream_id, target_org="insurer", agent="echo", skill="say"
                    ),
                    timeout=20,
                    metadata=bearer(token),
                )
                answers.extend([u async for u in call])
                for task_id in (unary_id, stream_id):
                    answers.append(
                        await ours.GetTask(
                            pb.GetTaskRequest(task_id=task_id), timeout=5, metadata=bearer(token)
                        )
                    )
        finally:
            hospital.peers.set_address("insurer", real)
            await server.stop(0)
        assert answers[0].state == state
        for answer in answers:
            wire = answer.SerializeToString()
            assert not any(secret in wire for secret in SECRETS), answer
        for task_id in (unary_id, stream_id):
            row = await hospital.router.tasks.by_task_id("hospital", task_id)
            assert row is not None and row.result is not None and row.result.output == {}


async def test_a_partners_unary_answer_that_ends_nothing_fails_the_task(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """A unary SubmitTask answers with the state that ends the turn. A partner answering
    WORKING (or SUBMITTED) has not answered: the task fails there as an unreadable answer,
    instead of waiting for a next message nobody asked for."""
    token = hospital_tokens(secure_fed).issue("clerk", calls=["insurer/echo.say"])
    hospital = secure_fed["hospital"]
    cert, key = pki.pem("insurer")
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=pki.ca.read_bytes(), require_client_auth=True
    )
    server = grpc.aio.server()
    pb_grpc.add_FederationServicer_to_server(
        _FailingWithOutputPartner(pb.TASK_STATE_WORKING), server
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    real = hospital.peers.address("insurer")
    hospital.peers.set_address("insurer", f"127.0.0.1:{port}")
    try:
        async with participant_client(secure_fed, "hospital") as ours:
            answer = await ours.SubmitTask(
                pb.TaskRequest(task_id="no-end-1", target_org="insurer", agent="echo", skill="say"),
                timeout=20,
                metadata=bearer(token),
            )
    finally:
        hospital.peers.set_address("insurer", real)
        await server.stop(0)
    assert answer.state == pb.TASK_STATE_FAILED
    assert answer.error.code == "invalid_result"
    assert not hospital.router.executions.by_id, "the task ended"
