"""Every path of an exchange leaves the expected audit records on both sides, and the chains verify."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from fedgate.convert import dict_to_struct
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.audit.store import MemoryAuditStore
from gateway.exchange.agents import AgentBackend
from gateway.exchange.tasks import AgentCard, SkillCard, TaskSpec, TaskState, TaskUpdate
from gateway.local import LocalFederation
from participant_sdk import (
    Client,
    DeadlineExceeded,
    PermissionDenied,
    RetryPolicy,
    TaskFailed,
    Unavailable,
)
from tests.conftest import Pki
from tests.integration.federation import (
    boom_agent,
    configs,
    delegation,
    echo_agent,
    eventually,
    federation_channel,
    records_agent,
    serving,
    slow_agent,
)


def kinds(fed: LocalFederation, org: str, task_id: str) -> list[str]:
    return [r.kind for r in sorted(fed[org].audit.query(task_id=task_id), key=lambda r: r.sequence)]


def assert_chains_verify(fed: LocalFederation) -> None:
    for org, gateway in fed.gateways.items():
        report = gateway.audit.verify(org, gateway.router.verifier)
        assert report.ok, report.problems


async def test_success_leaves_four_records_with_matching_digests(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), records_agent()),
        Client(fed.participant("insurer"), requester="adjuster-7") as client,
    ):
        result = await client.call(
            "hospital/records.summary", {"patient_id": "P-1"}, timeout=10, task_id="ok-1"
        )
    assert kinds(fed, "insurer", "ok-1") == ["request_sent", "result_received"]
    assert kinds(fed, "hospital", "ok-1") == ["request_received", "result_released"]
    sent, received = sorted(fed["insurer"].audit.query(task_id="ok-1"), key=lambda r: r.sequence)
    got, released = sorted(fed["hospital"].audit.query(task_id="ok-1"), key=lambda r: r.sequence)
    assert sent.digest_after == got.digest_before, "what left A is what B received"
    assert released.digest_after == received.digest_after, "what B released is what A received"
    assert released.digest_before != released.digest_after
    assert "patient.name" in released.withheld_paths
    assert ("patient.ssn", "masked") in released.transformed
    assert released.receipt is not None and received.receipt == released.receipt
    assert released.requester == "adjuster-7" and received.requester == "adjuster-7"
    assert released.policy_version == result.policy_version
    assert_chains_verify(fed)


async def test_no_withheld_value_reaches_either_audit_log(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), records_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        await client.call(
            "hospital/records.summary", {"patient_id": "P-1"}, timeout=10, task_id="leak-1"
        )
    for org in ("hospital", "insurer"):
        text = repr(fed[org].audit.query(task_id="leak-1"))
        for secret in ("Ada Lovelace", "123-45-6789", "INS-99887766", "12 Analytical Row"):
            assert secret not in text, (org, secret)


async def test_denied_invoke_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent("triage")),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(PermissionDenied):
            await client.call("hospital/triage.say", {}, timeout=5, task_id="deny-1")
    assert kinds(fed, "hospital", "deny-1") == ["invoke_denied"]
    (denied,) = fed["hospital"].audit.query(task_id="deny-1")
    assert denied.detail == "no invoke rule allows it"
    assert kinds(fed, "insurer", "deny-1") == ["request_sent", "failed"]
    assert_chains_verify(fed)


async def test_unknown_agent_is_recorded_with_its_real_reason(fed: LocalFederation) -> None:
    async with Client(fed.participant("insurer")) as client:
        with pytest.raises(PermissionDenied):
            await client.call("hospital/nosuch.say", {}, timeout=5, task_id="ghost-1")
    (denied,) = fed["hospital"].audit.query(task_id="ghost-1")
    assert denied.kind == "invoke_denied" and denied.detail == "no agent instance has this skill"


async def test_agent_failure_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), boom_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(TaskFailed):
            await client.call("hospital/boom.fail", {}, timeout=5, task_id="boom-1")
    assert kinds(fed, "hospital", "boom-1") == ["request_received", "failed"]
    assert kinds(fed, "insurer", "boom-1") == ["request_sent", "failed"]
    (_, failed) = sorted(fed["hospital"].audit.query(task_id="boom-1"), key=lambda r: r.sequence)
    assert "4242" not in repr(failed)


async def test_cancel_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        updates = client.stream(
            "hospital/slow.wait", {"seconds": 30}, timeout=20, task_id="cancel-1"
        )
        await anext(updates)
        await client.cancel("cancel-1")
        _ = [u async for u in updates]
        await eventually(lambda: "canceled" in kinds(fed, "hospital", "cancel-1"))
    assert kinds(fed, "insurer", "cancel-1") == ["request_sent", "canceled"]
    assert kinds(fed, "hospital", "cancel-1") == ["request_received", "canceled"]


async def test_deadline_is_recorded_on_both_sides(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        with pytest.raises(DeadlineExceeded):
            await client.call("hospital/slow.wait", {"seconds": 30}, timeout=2, task_id="late-1")
    # both gateways record the end on their own, each within moments
    await eventually(
        lambda: all(len(kinds(fed, org, "late-1")) == 2 for org in ("insurer", "hospital"))
    )
    assert kinds(fed, "insurer", "late-1") == ["request_sent", "failed"]
    assert kinds(fed, "hospital", "late-1") == ["request_received", "failed"]
    statuses = {r.status for r in fed["hospital"].audit.query(task_id="late-1")}
    assert "DEADLINE_EXCEEDED" in statuses


async def test_outbound_over_the_limits_is_refused_and_recorded(fed: LocalFederation) -> None:
    deep: dict = {}
    node = deep
    for _ in range(33):
        node["x"] = {}
        node = node["x"]
    from participant_sdk import InvalidArgument

    async with Client(fed.participant("hospital")) as client:
        with pytest.raises(InvalidArgument, match="nested deeper than 32"):
            await client.call("insurer/echo.say", deep, timeout=5, task_id="deep-1")
    assert kinds(fed, "hospital", "deep-1") == ["rejected"]


async def test_failing_store_refuses_exchanges_then_recovers(tmp_path: Path, pki: Pki) -> None:
    store = MemoryAuditStore()
    async with LocalFederation(configs(tmp_path, pki), audits={"hospital": store}) as fed:
        async with (
            serving(fed.participant("hospital"), echo_agent()),
            Client(fed.participant("insurer")) as client,
        ):
            store.fail_writes = True
            with pytest.raises(Unavailable, match="audit store cannot be written"):
                await client.call("hospital/echo.say", {"n": 1}, timeout=5, task_id="down-1")
            assert not store.healthy
            store.fail_writes = False
            result = await client.call("hospital/echo.say", {"n": 2}, timeout=5, task_id="up-1")
        assert result.output["echo"] == {"n": 2}
        assert store.healthy
        assert kinds(fed, "hospital", "up-1") == ["request_received", "result_released"]
        assert kinds(fed, "hospital", "down-1") == []
        assert_chains_verify(fed)


async def test_failing_requester_store_sends_nothing(tmp_path: Path, pki: Pki) -> None:
    store = MemoryAuditStore()
    seen: list[str] = []
    from participant_sdk import Agent

    echo = Agent("echo")

    @echo.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        seen.append(task.task_id)
        return {}

    async with (
        LocalFederation(configs(tmp_path, pki), audits={"insurer": store}) as fed,
        serving(fed.participant("hospital"), echo),
        Client(fed.participant("insurer")) as client,
    ):
        store.fail_writes = True
        with pytest.raises(Unavailable, match="audit store cannot be written"):
            await client.call("hospital/echo.say", {}, timeout=5, task_id="quiet-1")
    assert seen == [], "no request leaves without its durable request_sent record"


def _counting_echo(runs: list[str], fail_store_while_running: MemoryAuditStore | None = None):  # type: ignore[no-untyped-def]
    from participant_sdk import Agent

    echo = Agent("echo")

    @echo.skill
    async def say(task, data):  # type: ignore[no-untyped-def]
        runs.append(task.task_id)
        if fail_store_while_running is not None:
            fail_store_while_running.fail_writes = True
        return {"echo": data}

    return echo


@pytest.mark.parametrize("failing", ["insurer", "hospital"])
async def test_a_key_taken_while_its_first_record_failed_is_given_back(
    tmp_path: Path, pki: Pki, failing: str
) -> None:
    """The first record and the task table commit together: when the record fails, nothing is
    written, the key is not taken, and a retry with the same key runs the task (once)."""
    store = MemoryAuditStore()
    runs: list[str] = []
    async with (
        LocalFederation(configs(tmp_path, pki), audits={failing: store}) as fed,
        serving(fed.participant("hospital"), _counting_echo(runs)),
        Client(fed.participant("insurer"), retry=RetryPolicy(max_attempts=1)) as client,
    ):
        store.fail_writes = True
        with pytest.raises(Unavailable, match="audit store cannot be written"):
            await client.call(
                "hospital/echo.say", {"n": 1}, timeout=5, task_id="given-1", idempotency_key="k-1"
            )
        store.fail_writes = False
        result = await client.call(
            "hospital/echo.say", {"n": 1}, timeout=5, task_id="given-1", idempotency_key="k-1"
        )
    assert result.output["echo"] == {"n": 1}
    assert runs == ["given-1"], "the skill ran once, on the retry"
    # The insurer's task goes on when the hospital's store refuses it: asked again, the
    # hospital takes it once its store is back; the call in between heard UNAVAILABLE.
    assert kinds(fed, "insurer", "given-1") == ["request_sent", "result_received"]
    assert kinds(fed, "hospital", "given-1") == ["request_received", "result_released"]
    assert_chains_verify(fed)


async def test_a_result_whose_release_record_failed_goes_out_only_once_recorded(
    tmp_path: Path, pki: Pki
) -> None:
    """`result_released` and the task's final row commit together. When the store cannot be
    written, the caller hears UNAVAILABLE at once and nothing is released; the gateway tries the
    write again, so once the store is back a re-call with the key collects the result, under
    the task's own id, and every release is recorded."""
    store = MemoryAuditStore()
    runs: list[str] = []
    async with (
        LocalFederation(configs(tmp_path, pki), audits={"hospital": store}) as fed,
        serving(fed.participant("hospital"), _counting_echo(runs, store)),
        Client(fed.participant("insurer"), retry=RetryPolicy(max_attempts=1)) as client,
    ):
        with pytest.raises(Unavailable, match="audit store cannot be written"):
            await client.call(
                "hospital/echo.say", {"n": 7}, timeout=5, task_id="rel-1", idempotency_key="k-7"
            )
        row = await fed["hospital"].router.tasks.by_task_id("insurer", "rel-1")
        assert row is not None and row.result is None, "nothing kept while unrecorded"
        assert kinds(fed, "hospital", "rel-1") == ["request_received"]
        store.fail_writes = False
        again = await client.call(
            "hospital/echo.say", {"n": 7}, timeout=5, task_id="rel-2", idempotency_key="k-7"
        )
        row = await fed["hospital"].router.tasks.by_task_id("insurer", "rel-1")
    assert again.task_id == "rel-1" and again.output["echo"] == {"n": 7}
    assert runs == ["rel-1"], "the skill ran once"
    hospital = kinds(fed, "hospital", "rel-1")
    # The insurer asked again while the store was down: its repeats may be recorded before
    # or after the result, which goes out only with a result_released record.
    assert hospital[0] == "request_received" and "result_released" in hospital
    assert set(hospital) <= {"request_received", "result_released", "result_kept"}
    assert row is not None and row.result is not None and row.result.output == {"echo": {"n": 7}}
    assert kinds(fed, "hospital", "rel-2") == []
    assert_chains_verify(fed)


@pytest.mark.parametrize(("lifetime", "closing"), [(3.0, "result_received"), (2.0, "failed")])
async def test_a_requester_leaving_does_not_end_the_task(
    fed: LocalFederation, lifetime: float, closing: str
) -> None:
    """A requester that goes away is not a cancel (issue 15 #2): the task runs on, and both
    gateways close its records as the task itself ends: its result, or its deadline."""
    task_id = f"leave-{closing}"
    deadline = time.time() + lifetime
    spec = TaskSpec(
        task_id=task_id,
        target_org="hospital",
        agent="slow",
        skill="wait",
        input={"seconds": 0.5 if closing == "result_received" else 10},
        requester="adjuster-9",
        deadline=deadline,
    )

    async def consume() -> None:
        async for _ in fed["insurer"].router.submit(spec, stream=False):
            pass

    async with serving(fed.participant("hospital"), slow_agent()):
        requester = asyncio.ensure_future(consume())
        await eventually(lambda: kinds(fed, "hospital", task_id))
        requester.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await requester
        await eventually(lambda: len(kinds(fed, "insurer", task_id)) >= 2, 10)
        await eventually(lambda: len(kinds(fed, "hospital", task_id)) >= 2, 10)
    assert kinds(fed, "insurer", task_id) == ["request_sent", closing]
    hospital = kinds(fed, "hospital", task_id)
    if closing == "failed":
        assert hospital == ["request_received", "failed"]
        for org in ("insurer", "hospital"):
            last = max(fed[org].audit.query(task_id=task_id), key=lambda r: r.sequence)
            assert last.status == "DEADLINE_EXCEEDED" and last.decision == "error"
            assert last.detail.startswith("deadline_exceeded")
    else:
        assert hospital == ["request_received", "result_released"]
    assert_chains_verify(fed)


async def test_a_peers_get_task_never_carries_the_output(fed: LocalFederation, pki: Pki) -> None:
    """Output leaves only with a `result_released` record: GetTask tells a peer the state only,
    and the result is collected by sending the task again with its key (recorded as sent again).
    """

    def request() -> pb.TaskRequest:
        return pb.TaskRequest(
            task_id="got-1",
            target_org="hospital",
            agent="echo",
            skill="say",
            input=dict_to_struct({"n": 5}),
            delegation=delegation(pki, "insurer", "hospital", "got-1"),
        )

    channel = federation_channel(
        pki, fed.federation("hospital"), cert="insurer", target_org="hospital"
    )
    stub = pb_grpc.FederationStub(channel)
    try:
        async with serving(fed.participant("hospital"), echo_agent()):
            first = await stub.SubmitTask(request(), timeout=5)
            answer = await stub.GetTask(pb.GetTaskRequest(task_id="got-1"), timeout=5)
            again = await stub.SubmitTask(request(), timeout=5)
    finally:
        await channel.close()
    assert first.state == answer.state == again.state == pb.TASK_STATE_COMPLETED
    assert first.output.fields and again.output == first.output
    assert not answer.output.fields and not answer.HasField("receipt")
    assert kinds(fed, "hospital", "got-1") == [
        "request_received",
        "result_released",
        "request_received",
        "result_released",
    ]
    resent = max(fed["hospital"].audit.query(task_id="got-1"), key=lambda r: r.sequence)
    assert "sent again" in resent.detail


async def test_stored_payloads_keep_files_as_digests_only(tmp_path: Path, pki: Pki) -> None:
    """[audit] store_payloads keeps our own side's payloads, but a file's bytes never: only
    their digest (a file part of an A2A message maps to {"file": {..., "bytes": base64}})."""
    import base64
    import hashlib

    from tests.integration.federation import HOSPITAL_RULES, INSURER_RULES, org_config

    extra = "[audit]\nstore_payloads = true\n"
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL_RULES, ["insurer"], extra=extra),
        org_config(tmp_path, pki, "insurer", INSURER_RULES, ["hospital"], extra=extra),
    ]
    raw = b"%PDF-1.7 scan of the referral"
    document = {"file": {"name": "referral.pdf", "bytes": base64.b64encode(raw).decode()}}
    async with (
        LocalFederation(paths) as fed,
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        result = await client.call("hospital/echo.say", document, timeout=10, task_id="file-1")
    assert result.output["echo"] == document, "the file itself went through"
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    for org in ("hospital", "insurer"):
        records = fed[org].audit.query(task_id="file-1")
        stored = [r.payload for r in records if r.payload is not None]
        assert stored, f"{org} stored its payloads"
        text = repr(stored)
        assert base64.b64encode(raw).decode() not in text, org
        assert digest in text, org


class _CancelWhileClosing(MemoryAuditStore):
    """A store during whose commit of a task's closing record a cancel of the task arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel: Callable[[], Awaitable[object]] | None = None
        self.cancels: list[asyncio.Future[object]] = []

    async def write(self, events, op=None):  # type: ignore[no-untyped-def,override]
        closing = events is not None and any(
            e.kind == "failed" for e in ((events,) if hasattr(events, "kind") else events)
        )
        if closing and self.cancel is not None:
            self.cancels.append(asyncio.ensure_future(self.cancel()))
        return await super().write(events, op)


async def test_a_cancel_while_the_closing_record_commits_does_not_replace_the_answer(
    tmp_path: Path, pki: Pki
) -> None:
    """The task failed and its record commits when the cancel comes: the cancel waits for the
    write, and the task has ended, so the peer gets the failure it recorded, not UNAVAILABLE
    ("shutting down") while the answer's signed head was being made."""
    from tests.security.raw import federation_client, task_request

    store = _CancelWhileClosing()
    async with LocalFederation(configs(tmp_path, pki), audits={"hospital": store}) as fed:
        router = fed["hospital"].router
        store.cancel = lambda: router.cancel("cw-1", "enough", origin_org="insurer")
        async with (
            serving(fed.participant("hospital"), boom_agent()),
            federation_client(pki, fed, "insurer") as peer,
        ):
            answer = await peer.SubmitTask(
                task_request(pki, "insurer", "cw-1", agent="boom", skill="fail"), timeout=10
            )
        assert answer.state == pb.TASK_STATE_FAILED
        assert answer.error.code == "skill_error"
        assert kinds(fed, "hospital", "cw-1") == ["request_received", "failed"]
        assert_chains_verify(fed)


async def test_a_cancel_while_the_store_is_down_still_lets_the_result_be_recorded(
    tmp_path: Path, pki: Pki
) -> None:
    """The store goes down as the result comes, and the peer, told UNAVAILABLE, cancels. The
    task had ended: its record is written once the store is back (the cancel changes nothing),
    rather than left open, its key answering 'interrupted by a restart' until one."""
    from tests.security.raw import federation_client, task_request

    store = MemoryAuditStore()
    runs: list[str] = []
    async with (
        LocalFederation(configs(tmp_path, pki), audits={"hospital": store}) as fed,
        serving(fed.participant("hospital"), _counting_echo(runs, store)),
        federation_client(pki, fed, "insurer") as peer,
    ):
        router = fed["hospital"].router
        request = task_request(pki, "insurer", "cd-1", input=dict_to_struct({"n": 1}))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await peer.SubmitTask(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await router.cancel("cd-1", "no answer", origin_org="insurer") is (
            TaskState.CANCELED
        )
        await asyncio.sleep(0.2)  # the close is tried again meanwhile
        store.fail_writes = False
        assert await eventually(lambda: not router.executions.by_id, 5)
        row = await router.tasks.by_task_id("insurer", "cd-1")
        again = await peer.SubmitTask(
            task_request(pki, "insurer", "cd-1", input=dict_to_struct({"n": 1})), timeout=10
        )
    assert row is not None and row.result is not None, "the task's row was finished"
    assert again.state == pb.TASK_STATE_COMPLETED and runs == ["cd-1"]
    assert kinds(fed, "hospital", "cd-1")[:2] == ["request_received", "result_kept"]
    assert_chains_verify(fed)


class _BrokenBackend(AgentBackend):
    """A local agent the gateway calls itself whose turn fails with an unexpected error."""

    name = "echo"

    @property
    def card(self) -> AgentCard | None:
        return AgentCard(org="hospital", name="echo", skills=(SkillCard("say"),))

    async def _fail(self, spec: TaskSpec) -> AsyncGenerator[TaskUpdate, None]:
        yield TaskUpdate(spec.task_id, TaskState.WORKING)
        raise RuntimeError("the backend broke 4242")

    def dispatch(self, spec: TaskSpec, requester_org: str) -> AsyncGenerator[TaskUpdate, None]:
        return self._fail(spec)

    def continue_task(self, spec: TaskSpec, requester_org: str) -> AsyncGenerator[TaskUpdate, None]:
        return self._fail(spec)

    def end(self, task_id: str, reason: str) -> None:
        pass


async def test_an_unexpected_failure_of_a_dispatch_closes_the_task(fed: LocalFederation) -> None:
    """A dispatch that raises something unexpected (a backend's bug) fails the task with its
    closing record, as any failure does: not a request left open, its key answering
    'interrupted by a restart' to every retry, and its requester kept retrying to the end."""
    fed["hospital"].agents.add_backend(_BrokenBackend())
    async with Client(fed.participant("insurer"), retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(TaskFailed):
            await client.call("hospital/echo.say", {}, timeout=5, task_id="broken-1")
    assert kinds(fed, "hospital", "broken-1") == ["request_received", "failed"]
    assert kinds(fed, "insurer", "broken-1") == ["request_sent", "failed"]
    row = await fed["hospital"].router.tasks.by_task_id("insurer", "broken-1")
    assert row is not None and row.result is not None
    assert "4242" not in repr(fed["hospital"].audit.query(task_id="broken-1"))
    assert_chains_verify(fed)


async def test_a_stop_while_a_closing_record_waits_for_the_store_is_prompt(
    tmp_path: Path, pki: Pki
) -> None:
    """A requester's cancel waits for a closing record the store cannot take yet; a stop at
    shutdown does not: the task stays open in the table, for recovery after the restart."""
    from tests.security.raw import federation_client, task_request

    store = MemoryAuditStore()
    runs: list[str] = []
    fed = await LocalFederation(configs(tmp_path, pki), audits={"hospital": store}).start()
    try:
        async with (
            serving(fed.participant("hospital"), _counting_echo(runs, store)),
            federation_client(pki, fed, "insurer") as peer,
        ):
            request = task_request(pki, "insurer", "cs-1", input=dict_to_struct({"n": 1}))
            with pytest.raises(grpc.aio.AioRpcError):
                await peer.SubmitTask(request, timeout=10)
            await fed["hospital"].router.cancel("cs-1", "no answer", origin_org="insurer")
            started = time.monotonic()
            await fed["hospital"].router.stop_background()
            assert time.monotonic() - started < 2.0, "the stop did not wait for the store"
    finally:
        store.fail_writes = False
        await fed.stop()
    assert runs == ["cs-1"]


async def test_a_task_table_that_cannot_be_read_is_unavailable_not_internal(
    tmp_path: Path, pki: Pki
) -> None:
    """The database goes away: a GetTask (a read of the task table) answers UNAVAILABLE
    naming the task table, as a write does, not INTERNAL with a traceback in the log."""
    from sqlalchemy import create_engine

    from gateway.audit.store import SqlAuditStore

    store = SqlAuditStore(f"sqlite:///{tmp_path / 'fedgate.db'}")
    async with (
        LocalFederation(configs(tmp_path, pki), audits={"hospital": store}) as fed,
        grpc.aio.insecure_channel(fed.participant("hospital")) as channel,
    ):
        working = store._engine
        # The database file is out of reach from now on (a volume gone, say).
        store._engine = create_engine(f"sqlite:///{tmp_path / 'gone' / 'fedgate.db'}")
        try:
            stub = pb_grpc.ParticipantStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetTask(pb.GetTaskRequest(task_id="t-unknown"), timeout=5)
        finally:
            store._engine.dispose()
            store._engine = working
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "task table cannot be read" in (refused.value.details() or "")
