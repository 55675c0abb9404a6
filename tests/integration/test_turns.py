"""Multi-turn tasks across organizations: a turn that ends input-required carries its output
only as a filtered, recorded, signed result, and the requester's next message continues the
same task under the same policies and records.

The agent here is written against the generated `fedgate.v1` stubs alone (no SDK), as any
protoc client could be; the requester uses the participant listener the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fedgate.convert import dict_to_struct, struct_to_dict
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.audit.store import MemoryAuditStore
from gateway.edges.wire import receipt_from_pb
from gateway.identity.signing import SignedReceipt, Verifier, verify_receipt
from gateway.local import LocalFederation
from tests.conftest import Pki
from tests.integration.federation import eventually, org_config

HOSPITAL = """\
p, insurer, intake, chat, invoke, *, allow
p, insurer, intake, chat, share, question, allow
p, insurer, intake, chat, share, summary, allow
"""
INSURER = """\
p, hospital, intake, chat, send, answer, allow
p, hospital, intake, chat, send, topic, allow
"""


@pytest.fixture
async def two(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL, ["insurer"]),
        org_config(tmp_path, pki, "insurer", INSURER, ["hospital"]),
    ]
    async with LocalFederation(paths) as fed:
        yield fed


class RawAgent:
    """An `intake.chat` agent speaking the participant protocol by hand: it asks one question
    (input-required, with a field the hospital's policy withholds) and answers the reply."""

    def __init__(self, address: str, *, reply_delay: float = 0.0) -> None:
        self.address = address
        self.reply_delay = reply_delay  # before it answers a next message
        self.inputs: list[tuple[int, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawAgent:
        card = pb.AgentCard(name="intake", skills=[pb.Skill(name="chat")])
        self.outbox.put_nowait(pb.AgentMessage(register=pb.RegisterAgents(cards=[card])))
        self._task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self.registered.wait(), 10)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.outbox.put_nowait(None)
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def _requests(self) -> AsyncIterator[pb.AgentMessage]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.ParticipantStub(channel)
            async for message in stub.Connect(self._requests()):
                kind = message.WhichOneof("kind")
                if kind == "registered":
                    self.registered.set()
                elif kind == "cancel":
                    self.cancelled.append(message.cancel.task_id)
                elif kind == "task":
                    request = message.task.request
                    data = struct_to_dict(request.input)
                    self.inputs.append((request.turn, data))
                    if request.turn == 0:
                        state = pb.TASK_STATE_INPUT_REQUIRED
                        output = {"question": "which ward?", "nurse_notes": "patient is anxious"}
                    else:
                        state = pb.TASK_STATE_COMPLETED
                        output = {"summary": f"booked in {data.get('answer')}", "bed": "B-12"}
                    result = pb.TaskResult(
                        task_id=request.task_id, state=state, output=dict_to_struct(output)
                    )
                    update = pb.TaskUpdate(task_id=request.task_id, state=state, result=result)
                    if request.turn and self.reply_delay:
                        await asyncio.sleep(self.reply_delay)
                    self.outbox.put_nowait(pb.AgentMessage(update=update))


def _request(task_id: str, data: dict[str, Any], turn: int = 0, **extra: Any) -> pb.TaskRequest:
    return pb.TaskRequest(
        task_id=task_id,
        target_org="hospital",
        agent="intake",
        skill="chat",
        input=dict_to_struct(data),
        deadline_unix_ms=int((time.time() + extra.pop("seconds", 10)) * 1000),
        turn=turn,
        **extra,
    )


def _kinds(fed: LocalFederation, org: str, task_id: str) -> list[tuple[str, str]]:
    records = sorted(fed[org].audit.query(task_id=task_id), key=lambda r: r.sequence)
    return [(r.kind, r.status) for r in records]


async def test_a_conversation_crosses_organizations_turn_by_turn(
    two: LocalFederation, pki: Pki
) -> None:
    async with (
        RawAgent(two.participant("hospital")) as agent,
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        first = await stub.SubmitTask(
            _request("talk-1", {"topic": "admission", "internal": "x"}), timeout=10
        )
        assert first.state == pb.TASK_STATE_INPUT_REQUIRED and first.turn == 0
        # The question leaves filtered, with a receipt, like any result.
        assert struct_to_dict(first.output) == {"question": "which ward?"}
        assert [a.path for a in first.field_actions] == ["*"], "a key no rule names is not named"
        receipt = SignedReceipt.from_json(receipt_from_pb(first.receipt))
        verify_receipt(Verifier.from_file(pki.ca), receipt, expected_org="hospital")
        assert receipt.body.task_id == "talk-1"
        second = await stub.SubmitTask(
            _request("talk-1", {"answer": "cardiology", "password": "hunter2"}, turn=1),
            timeout=10,
        )
    assert second.state == pb.TASK_STATE_COMPLETED and second.turn == 1
    assert struct_to_dict(second.output) == {"summary": "booked in cardiology"}
    # Every turn went through the send policy: what the agent saw of each message.
    assert agent.inputs == [(0, {"topic": "admission"}), (1, {"answer": "cardiology"})]
    assert _kinds(two, "insurer", "talk-1") == [
        ("request_sent", "submitted"),
        ("result_received", "input-required"),
        ("request_sent", "submitted"),
        ("result_received", "completed"),
    ]
    assert _kinds(two, "hospital", "talk-1") == [
        ("request_received", "submitted"),
        ("result_released", "input-required"),
        ("request_received", "submitted"),
        ("result_released", "completed"),
    ]
    for org in ("hospital", "insurer"):
        text = repr(two[org].audit.query(task_id="talk-1"))
        assert "anxious" not in text and "hunter2" not in text and "B-12" not in text
        assert two[org].audit.verify(org, two[org].router.verifier).ok


async def test_a_repeated_turn_gets_its_result_and_a_wrong_turn_is_refused(
    two: LocalFederation,
) -> None:
    async with (
        RawAgent(two.participant("hospital")) as agent,
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        first = await stub.SubmitTask(_request("talk-2", {"topic": "a"}), timeout=10)
        again = await stub.SubmitTask(_request("talk-2", {"topic": "a"}), timeout=10)
        assert again.state == first.state == pb.TASK_STATE_INPUT_REQUIRED
        assert again.output == first.output and again.receipt == first.receipt
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitTask(_request("talk-2", {"answer": "b"}, turn=3), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "turn 3 cannot start now" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.SubmitTask(_request("talk-nope", {"answer": "b"}, turn=1), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        done = await stub.SubmitTask(_request("talk-2", {"answer": "b"}, turn=1), timeout=10)
    assert done.state == pb.TASK_STATE_COMPLETED
    assert [turn for turn, _ in agent.inputs] == [0, 1], "each turn reached the agent once"


async def test_a_task_waiting_for_its_next_message_ends_at_its_deadline(
    two: LocalFederation,
) -> None:
    async with (
        RawAgent(two.participant("hospital")) as agent,
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        first = await stub.SubmitTask(_request("talk-3", {"topic": "a"}, seconds=1.5), timeout=10)
        assert first.state == pb.TASK_STATE_INPUT_REQUIRED
        assert await eventually(lambda: "talk-3" in agent.cancelled, 5), (
            "the agent was told to stop the task when its deadline passed"
        )
        assert await eventually(lambda: len(_kinds(two, "hospital", "talk-3")) == 3, 5)
        assert await eventually(lambda: len(_kinds(two, "insurer", "talk-3")) == 3, 5)
        answer = await stub.GetTask(pb.GetTaskRequest(task_id="talk-3"), timeout=5)
    assert answer.state == pb.TASK_STATE_FAILED
    for org in ("hospital", "insurer"):
        kind, status = _kinds(two, org, "talk-3")[-1]
        assert (kind, status) == ("failed", "DEADLINE_EXCEEDED"), org


def _intake_agent() -> Any:
    from participant_sdk import Agent, TaskContext

    intake = Agent("intake")

    @intake.skill
    async def chat(task: TaskContext, data: dict) -> dict:
        reply = await task.ask({"question": "which ward?", "nurse_notes": "anxious"})
        again = await task.ask({"question": f"{reply.get('answer')}: which bed?"})
        return {"summary": f"booked in {reply.get('answer')}, bed {again.get('answer')}"}

    return intake


async def test_the_sdk_asks_and_replies_across_organizations(two: LocalFederation) -> None:
    """participant_sdk both sides: `task.ask` in the skill, `client.reply` at the requester."""
    from participant_sdk import Client
    from tests.integration.federation import serving

    async with (
        serving(two.participant("hospital"), _intake_agent()),
        Client(two.participant("insurer")) as client,
    ):
        first = await client.call("hospital/intake.chat", {"topic": "admission"}, timeout=10)
        assert first.awaiting_input and first.turn == 0
        assert first.output == {"question": "which ward?"}, "the share policy filtered it"
        second = await client.reply(first, {"answer": "cardiology", "password": "x"})
        assert second.awaiting_input and second.turn == 1
        assert second.output == {"question": "cardiology: which bed?"}
        done = await client.reply(second, {"answer": "B-12"})
    assert done.ok and done.turn == 2 and done.task_id == first.task_id
    assert done.output == {"summary": "booked in cardiology, bed B-12"}
    kinds = [k for k, _ in _kinds(two, "hospital", first.task_id)]
    assert kinds == ["request_received", "result_released"] * 3


def _peer_request(pki: Pki, task_id: str, data: dict[str, Any], turn: int = 0) -> pb.TaskRequest:
    """The request insurer's gateway sends for a turn, as any gateway written from proto/."""
    from tests.integration.federation import delegation

    request = _request(task_id, data, turn)
    # Who asked, as insurer's gateway names a requester that gave no name.
    subject = "insurer:unnamed-requester"
    request.delegation = delegation(pki, "insurer", "hospital", task_id, subject=subject)
    return request


async def test_a_repeated_turn_that_carries_output_is_recorded_as_sent_again(
    two: LocalFederation, pki: Pki
) -> None:
    """The question of an input-required turn is output like a final result: a repeat of the
    turn gets it again only with a record of its release, as a repeated final one does."""
    from tests.security.raw import federation_client

    async with (
        RawAgent(two.participant("hospital")),
        federation_client(pki, two, "insurer") as peer,
    ):
        first = await peer.SubmitTask(_peer_request(pki, "talk-5", {"topic": "a"}), timeout=10)
        again = await peer.SubmitTask(_peer_request(pki, "talk-5", {"topic": "a"}), timeout=10)
    assert first.state == again.state == pb.TASK_STATE_INPUT_REQUIRED
    assert struct_to_dict(again.output) == {"question": "which ward?"}
    assert _kinds(two, "hospital", "talk-5") == [
        ("request_received", "submitted"),
        ("result_released", "input-required"),
        ("request_received", "submitted"),
        ("result_released", "input-required"),
    ]
    records = sorted(two["hospital"].audit.query(task_id="talk-5"), key=lambda r: r.sequence)
    assert records[-1].detail == "retry: the stored result was sent again"
    assert records[-1].receipt == records[1].receipt


async def test_a_repeat_of_the_last_turn_after_the_task_ended_gets_its_result(
    two: LocalFederation, pki: Pki
) -> None:
    """A repeated turn gets that turn's result again, the last one too once the task has
    ended (a requester whose reply got UNAVAILABLE retries it): not NOT_FOUND, and the agent
    does not see the message twice."""
    from tests.security.raw import federation_client

    async with (
        RawAgent(two.participant("hospital")) as agent,
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
        federation_client(pki, two, "insurer") as peer,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        await stub.SubmitTask(_request("talk-6", {"topic": "a"}), timeout=10)
        done = await stub.SubmitTask(_request("talk-6", {"answer": "b"}, turn=1), timeout=10)
        assert done.state == pb.TASK_STATE_COMPLETED
        # Our requester asks its gateway again; insurer's gateway asks hospital's again.
        again = await stub.SubmitTask(_request("talk-6", {"answer": "b"}, turn=1), timeout=10)
        resent = await peer.SubmitTask(
            _peer_request(pki, "talk-6", {"answer": "b"}, turn=1), timeout=10
        )
    for answer in (again, resent):
        assert answer.state == pb.TASK_STATE_COMPLETED and answer.turn == 1
        assert answer.output == done.output and answer.receipt == done.receipt
    assert [turn for turn, _ in agent.inputs] == [0, 1], "each turn reached the agent once"
    assert _kinds(two, "hospital", "talk-6")[-2:] == [
        ("request_received", "submitted"),
        ("result_released", "completed"),
    ]


class _CancelWhileTheNextTurnCommits(MemoryAuditStore):
    """A store during whose commit of turn 1's request record the task is canceled."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.cancel: Any = None
        self.cancels: list[asyncio.Future[object]] = []

    async def write(self, events, op=None):  # type: ignore[no-untyped-def,override]
        opening = [e for e in ((events,) if hasattr(events, "kind") else events or ())]
        if any(e.kind == self.kind and e.turn == 1 for e in opening) and self.cancel is not None:
            self.cancels.append(asyncio.ensure_future(self.cancel()))
        return await super().write(events, op)


@pytest.mark.parametrize(
    ("org", "kind"), [("hospital", "request_received"), ("insurer", "request_sent")]
)
async def test_a_next_message_admitted_as_the_task_stops_gets_its_closing_record(
    tmp_path: Path, pki: Pki, org: str, kind: str
) -> None:
    """The requester's next message is recorded while the task, waiting for it, is canceled:
    the message's request record is closed (canceled, at its turn), never left open, and a
    partner's breaker admission taken for it is given back."""
    store = _CancelWhileTheNextTurnCommits(kind)
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL, ["insurer"]),
        org_config(tmp_path, pki, "insurer", INSURER, ["hospital"]),
    ]
    async with LocalFederation(paths, audits={org: store}) as fed:
        router = fed[org].router

        async def stop() -> None:
            # The task stops as a cancel (or its deadline) stops it, at once: at the partner's
            # gateway router.cancel would first tell the partner.
            router.executions.by_id["talk-7"].cancel("enough")

        store.cancel = stop
        async with (
            RawAgent(fed.participant("hospital")),
            grpc.aio.insecure_channel(fed.participant("insurer")) as channel,
        ):
            stub = pb_grpc.ParticipantStub(channel)
            first = await stub.SubmitTask(_request("talk-7", {"topic": "a"}), timeout=10)
            assert first.state == pb.TASK_STATE_INPUT_REQUIRED
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.SubmitTask(_request("talk-7", {"answer": "b"}, turn=1), timeout=10)
            assert await eventually(lambda: not router.executions.by_id, 5)
        records = sorted(fed[org].audit.query(task_id="talk-7"), key=lambda r: r.sequence)
        assert [(r.kind, r.turn) for r in records][-2:] == [(kind, 1), ("canceled", 1)]
        assert fed["insurer"].peers.health["hospital"].in_flight == 0


async def test_a_peers_turn_out_of_order_is_refused_and_recorded(
    two: LocalFederation, pki: Pki
) -> None:
    """Bad input is audited like any refusal (guarantee 5): a turn that cannot start now, a
    next message for a task that is not waiting for one, a task id running under another key."""
    from tests.security.raw import federation_client

    async with (
        RawAgent(two.participant("hospital")),
        federation_client(pki, two, "insurer") as peer,
    ):
        await peer.SubmitTask(_peer_request(pki, "talk-8", {"topic": "a"}), timeout=10)
        for task_id, turn, status in (
            ("talk-8", 3, grpc.StatusCode.INVALID_ARGUMENT),
            ("talk-nope", 1, grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await peer.SubmitTask(
                    _peer_request(pki, task_id, {"answer": "b"}, turn=turn), timeout=10
                )
            assert refused.value.code() == status
        other_key = _peer_request(pki, "talk-8", {"topic": "a"})
        other_key.idempotency_key = "another-key"  # the task id runs under its own key
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await peer.SubmitTask(other_key, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _kinds(two, "hospital", "talk-8")[-2:] == [("rejected", "INVALID_ARGUMENT")] * 2
    assert _kinds(two, "hospital", "talk-nope") == [("rejected", "NOT_FOUND")]


class _SlowNextTurn(MemoryAuditStore):
    """A store whose commit of turn 1's request record takes a while."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def write(self, events, op=None):  # type: ignore[no-untyped-def,override]
        opening = [e for e in ((events,) if hasattr(events, "kind") else events or ())]
        written = await super().write(events, op)
        if any(e.kind == self.kind and e.turn == 1 for e in opening):
            await asyncio.sleep(0.5)
        return written


@pytest.mark.parametrize(
    ("org", "kind"), [("hospital", "request_received"), ("insurer", "request_sent")]
)
async def test_a_next_message_whose_call_goes_away_while_it_is_recorded_still_runs(
    tmp_path: Path, pki: Pki, org: str, kind: str
) -> None:
    """A call that goes away ends its following, not the task: a next message whose request
    record commits as its call leaves is the task's next turn (collected with a repeat), not
    a record left open and the task left waiting for a message it already recorded."""
    store = _SlowNextTurn(kind)
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL, ["insurer"]),
        org_config(tmp_path, pki, "insurer", INSURER, ["hospital"]),
    ]
    from tests.security.raw import federation_client

    async with LocalFederation(paths, audits={org: store}) as fed:
        async with (
            RawAgent(fed.participant("hospital")) as agent,
            grpc.aio.insecure_channel(fed.participant("insurer")) as channel,
            federation_client(pki, fed, "insurer") as peer,
        ):
            stub = pb_grpc.ParticipantStub(channel)
            await stub.SubmitTask(_request("talk-9", {"topic": "a"}), timeout=10)
            # The call that brings the next message to `org`'s gateway, and then goes away.
            if org == "hospital":
                reply = _peer_request(pki, "talk-9", {"answer": "b"}, turn=1)
                call = peer.SubmitTask(reply, timeout=10)
            else:
                call = stub.SubmitTask(_request("talk-9", {"answer": "b"}, turn=1), timeout=10)
            await asyncio.sleep(0.2)  # its record is committing
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await eventually(lambda: len(agent.inputs) == 2, 5), "turn 1 ran"
            assert await eventually(lambda: not fed[org].router.executions.by_id, 5)
            if org == "hospital":
                again = _peer_request(pki, "talk-9", {"answer": "b"}, turn=1)
                done = await peer.SubmitTask(again, timeout=10)
            else:
                again = _request("talk-9", {"answer": "b"}, turn=1)
                done = await stub.SubmitTask(again, timeout=10)
        assert done.state == pb.TASK_STATE_COMPLETED and done.turn == 1
        records = sorted(fed[org].audit.query(task_id="talk-9"), key=lambda r: r.sequence)
        first_records = [r.turn for r in records if r.kind == kind and "retry" not in r.detail]
        assert first_records == [0, 1], "turn 1 was recorded once, and closed"
        closing = "result_received" if org == "insurer" else "result_kept"
        assert [r.kind for r in records if r.turn == 1][-1] in (closing, "result_released")


async def test_a_repeat_of_the_running_turn_follows_it(two: LocalFederation) -> None:
    """A requester that asks again while its next message's turn still runs (its reply got
    UNAVAILABLE: the partner out of reach, the store down; the SDK retries) follows that turn,
    as a repeat of a task's first call follows it: not INVALID_ARGUMENT, not a second run."""
    async with (
        RawAgent(two.participant("hospital"), reply_delay=0.5) as agent,
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        await stub.SubmitTask(_request("talk-10", {"topic": "a"}), timeout=10)
        reply = _request("talk-10", {"answer": "b"}, turn=1)
        first = asyncio.ensure_future(stub.SubmitTask(reply, timeout=10))
        assert await eventually(lambda: len(agent.inputs) == 2, 5)
        again = await stub.SubmitTask(reply, timeout=10)
        answer = await first
    assert again.state == answer.state == pb.TASK_STATE_COMPLETED
    assert again.output == answer.output and again.receipt == answer.receipt
    assert [turn for turn, _ in agent.inputs] == [0, 1]


async def test_a_next_message_whose_call_times_out_does_not_end_the_task(
    two: LocalFederation,
) -> None:
    """The deadline of the call that brings a next message is that call's: when it passes
    the call ends, the task does not (a requester leaving is not a cancel). The turn runs to
    its end within the task's deadline on both sides, and a repeat collects its result."""
    async with (
        RawAgent(two.participant("hospital"), reply_delay=1.0) as agent,
        grpc.aio.insecure_channel(two.participant("insurer")) as channel,
    ):
        stub = pb_grpc.ParticipantStub(channel)
        await stub.SubmitTask(_request("talk-11", {"topic": "a"}, seconds=20), timeout=10)
        reply = _request("talk-11", {"answer": "b"}, turn=1, seconds=0.4)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.SubmitTask(reply, timeout=10)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await eventually(lambda: len(_kinds(two, "hospital", "talk-11")) == 4, 5)
        assert await eventually(lambda: not two["insurer"].router.executions.by_id, 5)
        again = await stub.SubmitTask(_request("talk-11", {"answer": "b"}, turn=1), timeout=10)
    assert again.state == pb.TASK_STATE_COMPLETED and again.turn == 1
    assert [turn for turn, _ in agent.inputs] == [0, 1]
    for org in ("hospital", "insurer"):
        assert [k for k, _ in _kinds(two, org, "talk-11")][-1] in (
            "result_received",
            "result_kept",
            "result_released",
        ), org
