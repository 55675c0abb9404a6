"""The agent worker against a gateway written from proto/ alone: the scoped idempotency key a skill
sees, and the deadline (task.cancelled is set when it passes, not only on a cancel).

The gateway here is a real gRPC server on loopback port 0 implementing `Participant.Connect` from
the generated stubs: it hands assignments and never cancels, so whatever the worker does at a
deadline it does on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from fedgate.convert import dict_to_struct, struct_to_dict
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from participant_sdk import Agent, AgentWorker, DeadlineExceeded, TaskContext
from participant_sdk.testing import run_skill
from tests.integration.federation import eventually


def documented_key(requester_org: str, requester: str, target: str, key: str) -> str:
    """TaskContext.idempotency_key as its docstring defines it, computed independently."""
    owner = requester.split("/", 1)[0]
    return hashlib.sha256(f"{requester_org}\0{owner}\0{target}\0{key}".encode()).hexdigest()


class ScriptedGateway(pb_grpc.ParticipantServicer):
    """A participant listener that hands out assignments and collects the updates."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[pb.GatewayMessage] = asyncio.Queue()
        self.updates: asyncio.Queue[pb.TaskUpdate] = asyncio.Queue()
        self.registered = asyncio.Event()

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: Any
    ) -> AsyncIterator[pb.GatewayMessage]:
        first = await anext(aiter(request_iterator))
        assert first.WhichOneof("kind") == "register"

        async def read() -> None:
            async for message in request_iterator:
                if message.WhichOneof("kind") == "update":
                    await self.updates.put(message.update)

        reader = asyncio.ensure_future(read())
        try:
            yield pb.GatewayMessage(registered=pb.Registered(org="hospital", agents=["pay"]))
            self.registered.set()
            while True:
                yield await self.outbox.get()
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    def assign(
        self,
        task_id: str,
        data: dict[str, Any],
        *,
        seconds: float = 10.0,
        requester_org: str = "insurer",
        requester: str = "alice",
        key: str = "",
    ) -> None:
        assignment = pb.TaskAssignment(
            request=pb.TaskRequest(
                task_id=task_id,
                target_org="hospital",
                agent="pay",
                skill="charge",
                input=dict_to_struct(data),
                requester=requester,
                deadline_unix_ms=int((time.time() + seconds) * 1000),
                idempotency_key=key,
            ),
            requester_org=requester_org,
        )
        self.outbox.put_nowait(pb.GatewayMessage(task=assignment))

    def cancel(self, task_id: str) -> None:
        self.outbox.put_nowait(pb.GatewayMessage(cancel=pb.CancelAssignment(task_id=task_id)))

    async def final(self, task_id: str) -> pb.TaskUpdate:
        """The next final update (for `task_id`), within a bound."""
        while True:
            update = await asyncio.wait_for(self.updates.get(), 10)
            if update.state not in (pb.TASK_STATE_WORKING, pb.TASK_STATE_SUBMITTED):
                assert update.task_id == task_id, update
                return update


@contextlib.asynccontextmanager
async def worker_against(agent: Agent) -> AsyncIterator[ScriptedGateway]:
    gateway = ScriptedGateway()
    server = grpc.aio.server()
    pb_grpc.add_ParticipantServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    worker = AgentWorker([agent], f"127.0.0.1:{port}", max_backoff=0.2)
    running = asyncio.ensure_future(worker.run())
    try:
        await asyncio.wait_for(gateway.registered.wait(), 10)
        yield gateway
    finally:
        worker.stop()
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        await server.stop(0)


def payment_agent(runs: list[tuple[str, str]]) -> Agent:
    """Skill pay.charge: records (task id, the scoped key it saw) and answers the key."""
    pay = Agent("pay")

    @pay.skill
    async def charge(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        runs.append((task.task_id, task.idempotency_key))
        await asyncio.sleep(float(data.get("seconds", 0)))
        return {"key": task.idempotency_key}

    return pay


# ---- the scoped idempotency key (issue 15 #6) -----------------------------------------------


async def test_a_skill_sees_the_scoped_key_a_re_dispatch_under_another_task_id_keeps() -> None:
    runs: list[tuple[str, str]] = []
    want = documented_key("insurer", "alice/adjuster-7", "hospital/pay.charge", "pay-1")
    async with worker_against(payment_agent(runs)) as gateway:
        gateway.assign("t-1", {}, requester="alice/adjuster-7", key="pay-1")
        first = await gateway.final("t-1")
        assert struct_to_dict(first.result.output) == {"key": want}
        assert len(want) == 64 and "pay-1" not in want

        # The same logical request handed again under another task id (a re-call by key, or a
        # re-dispatch after a restart) is the same key; this worker answers it without a rerun.
        gateway.assign("t-2", {}, requester="alice/another-name", key="pay-1")
        again = await gateway.final("t-2")
        assert struct_to_dict(again.result.output) == {"key": want}
        assert runs == [("t-1", want)]

        # Another requester, another organization, another key: other tasks, other keys.
        others = {
            "t-3": ({"requester": "bob", "key": "pay-1"}, ("insurer", "bob", "pay-1")),
            "t-4": ({"requester_org": "lab", "key": "pay-1"}, ("lab", "alice", "pay-1")),
            "t-5": ({"key": "pay-2"}, ("insurer", "alice", "pay-2")),
            # No idempotency key: the task id is the key, as at the gateway.
            "t-6": ({}, ("insurer", "alice", "t-6")),
        }
        for task_id, (fields, (org, requester, key)) in others.items():
            gateway.assign(task_id, {}, **fields)  # type: ignore[arg-type]
            update = await gateway.final(task_id)
            expected = documented_key(org, requester, "hospital/pay.charge", key)
            assert struct_to_dict(update.result.output) == {"key": expected}, task_id
    assert [task_id for task_id, _ in runs] == ["t-1", "t-3", "t-4", "t-5", "t-6"]
    assert len({key for _, key in runs}) == 5


async def test_run_skill_gives_the_same_scoped_key() -> None:
    runs: list[tuple[str, str]] = []
    agent = payment_agent(runs)
    one = await run_skill(agent, "charge", {}, requester_org="insurer", idempotency_key="pay-1")
    two = await run_skill(agent, "charge", {}, requester_org="insurer", idempotency_key="pay-1")
    assert one == two == {"key": documented_key("insurer", "test", "local/pay.charge", "pay-1")}
    other = await run_skill(agent, "charge", {}, requester_org="insurer", task_id="t-9")
    assert other == {"key": documented_key("insurer", "test", "local/pay.charge", "t-9")}


# ---- the deadline sets task.cancelled (issue 12 defect 5) -------------------------------------


def stalling_agent(seen: list[str]) -> Agent:
    """Skill pay.charge that outlives any deadline; records what it saw when it was stopped."""
    pay = Agent("pay")

    @pay.skill
    async def charge(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        seen.append("started")
        if data.get("mode") == "polls":
            # A skill that watches the flag instead of being interrupted, and answers late.
            await asyncio.wait_for(task.cancelled.wait(), 10)
            seen.append("flag set")
            return {"late": True}
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled, flag set" if task.cancelled.is_set() else "cancelled, no flag")
            raise
        return {"finished": True}

    return pay


@pytest.mark.parametrize("mode", ["interrupted", "polls"])
async def test_the_deadline_sets_task_cancelled_under_a_gateway(mode: str) -> None:
    seen: list[str] = []
    async with worker_against(stalling_agent(seen)) as gateway:
        gateway.assign("t-late", {"mode": mode}, seconds=0.3)
        update = await gateway.final("t-late")
    assert update.state == pb.TASK_STATE_FAILED
    assert update.result.error.code == "deadline_exceeded"
    assert not struct_to_dict(update.result.output), "no output after the deadline"
    assert seen == ["started", "flag set" if mode == "polls" else "cancelled, flag set"]


@pytest.mark.parametrize("mode", ["interrupted", "polls"])
async def test_the_deadline_sets_task_cancelled_under_run_skill(mode: str) -> None:
    seen: list[str] = []
    with pytest.raises(DeadlineExceeded, match="passed its deadline"):
        await asyncio.wait_for(
            run_skill(stalling_agent(seen), "charge", {"mode": mode}, timeout=0.3), 10
        )
    assert seen == ["started", "flag set" if mode == "polls" else "cancelled, flag set"]


async def test_a_skills_own_timeout_is_its_error_not_the_deadline() -> None:
    pay = Agent("pay")

    @pay.skill
    async def charge(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        raise TimeoutError("the payment provider did not answer")

    async with worker_against(pay) as gateway:
        gateway.assign("t-own", {})
        update = await gateway.final("t-own")
    assert update.result.error.code == "skill_error"
    assert "payment provider" in update.result.error.message
    with pytest.raises(TimeoutError, match="payment provider"):
        await run_skill(pay, "charge", {})


async def test_a_cancel_from_the_gateway_is_a_cancel_not_the_deadline() -> None:
    seen: list[str] = []
    agent = stalling_agent(seen)
    async with worker_against(agent) as gateway:
        gateway.assign("t-cancel", {})
        assert await eventually(lambda: seen == ["started"])
        gateway.cancel("t-cancel")
        update = await gateway.final("t-cancel")
    assert update.state == pb.TASK_STATE_CANCELED
    assert update.result.error.code == "canceled"
    assert seen == ["started", "cancelled, flag set"]


async def test_through_real_gateways_the_key_is_scoped_by_the_proven_requesting_org(
    fed: Any,
) -> None:
    """insurer -> hospital over mTLS: the hospital's agent sees the key scoped by the organization
    the hospital proved from the certificate, the delegated requester and the target; the
    assignment carries all of it (no new field on the wire)."""
    from participant_sdk import Client
    from tests.integration.federation import serving

    runs: list[tuple[str, str]] = []
    echo = Agent("echo")  # shared with the insurer by HOSPITAL_RULES

    @echo.skill
    async def say(task: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
        runs.append((task.task_id, task.idempotency_key))
        return {"key": task.idempotency_key}

    async with (
        serving(fed.participant("hospital"), echo),
        Client(fed.participant("insurer"), requester="alice/adjuster-7") as alice,
        Client(fed.participant("insurer"), requester="bob") as bob,
    ):
        first = await alice.call("hospital/echo.say", {}, timeout=10, idempotency_key="pay-1")
        other = await bob.call("hospital/echo.say", {}, timeout=10, idempotency_key="pay-1")
    assert first.output == {
        "key": documented_key("insurer", "alice/adjuster-7", "hospital/echo.say", "pay-1")
    }
    assert other.output == {"key": documented_key("insurer", "bob", "hospital/echo.say", "pay-1")}
    assert len(runs) == 2
