"""Retries, fallback routes and fan-out strategies over fake stubs and callers: no gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from fedgate.v1 import fedgate_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from participant_sdk import (
    AllRoutesFailed,
    Client,
    DeadlineExceeded,
    FanOutFailed,
    FedgateError,
    InvalidArgument,
    NoAgreement,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    TaskFailed,
    TaskResult,
    Unauthenticated,
    Unavailable,
    majority,
    quorum,
)
from participant_sdk._errors import Cancelled
from participant_sdk._patterns import field_value, resolve_quorum

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeStub:
    """Answers SubmitTask from a script of errors and results, and records every request."""

    def __init__(self, *script: grpc.aio.AioRpcError | pb.TaskResult) -> None:
        self.script = list(script)
        self.requests: list[pb.TaskRequest] = []
        self.timeouts: list[float | None] = []

    async def SubmitTask(  # the grpc stub's signature
        self,
        request: pb.TaskRequest,
        *,
        timeout: float | None,  # noqa: ASYNC109
        metadata: Any,
    ) -> pb.TaskResult:
        self.requests.append(request)
        self.timeouts.append(timeout)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, grpc.aio.AioRpcError):
            raise step
        return step


def completed(task_id: str = "t", **output: Any) -> pb.TaskResult:
    from fedgate.convert import dict_to_struct

    return pb.TaskResult(
        task_id=task_id, state=pb.TASK_STATE_COMPLETED, output=dict_to_struct(output)
    )


async def client_with(stub: FakeStub, **kwargs: Any) -> Client:
    client = Client("127.0.0.1:1", **kwargs)
    client._stub = stub  # type: ignore[assignment]
    return client


# ---- retries ------------------------------------------------------------------------------


async def test_unavailable_is_retried_with_the_same_task_id_key_and_deadline() -> None:
    unavailable = rpc_error(grpc.StatusCode.UNAVAILABLE, "organization 'insurer' is unreachable")
    stub = FakeStub(unavailable, unavailable, completed(ok=True))
    async with await client_with(stub) as client:
        result = await client.call("insurer/claims.check", {}, timeout=5, retry=FAST)
    assert result.output == {"ok": True}
    assert len(stub.requests) == 3
    assert len({r.task_id for r in stub.requests}) == 1
    keys = {r.idempotency_key for r in stub.requests}
    assert keys == {stub.requests[0].task_id}, "without a key, the generated task id is the key"
    assert len({r.deadline_unix_ms for r in stub.requests}) == 1, "a retry never moves the deadline"
    timeouts = [t for t in stub.timeouts if t is not None]
    assert timeouts == sorted(timeouts, reverse=True) and timeouts[0] <= 5


async def test_a_given_task_id_and_key_are_kept() -> None:
    stub = FakeStub(rpc_error(grpc.StatusCode.UNAVAILABLE, "reset"), completed())
    async with await client_with(stub) as client:
        await client.call(
            "insurer/claims.check", {}, task_id="claim-7", idempotency_key="k-7", retry=FAST
        )
    assert [(r.task_id, r.idempotency_key) for r in stub.requests] == [("claim-7", "k-7")] * 2


async def test_a_given_task_id_is_the_key_when_no_key_is_given() -> None:
    stub = FakeStub(rpc_error(grpc.StatusCode.UNAVAILABLE, "reset"), completed())
    async with await client_with(stub) as client:
        await client.call("insurer/claims.check", {}, task_id="claim-8", retry=FAST)
    assert [(r.task_id, r.idempotency_key) for r in stub.requests] == [("claim-8", "claim-8")] * 2


async def test_client_level_policy_applies_and_a_call_can_turn_it_off() -> None:
    unavailable = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")
    stub = FakeStub(unavailable)
    async with await client_with(stub, retry=FAST) as client:
        with pytest.raises(
            Unavailable, match=r"connection reset by peer \(gave up after 4 attempts"
        ):
            await client.call("insurer/claims.check", {}, timeout=5)
        assert len(stub.requests) == 4
        stub.requests.clear()
        with pytest.raises(Unavailable, match=r"^connection reset by peer$"):
            await client.call(
                "insurer/claims.check", {}, timeout=5, retry=RetryPolicy(max_attempts=1)
            )
    assert len(stub.requests) == 1


async def test_by_default_a_client_retries_a_few_times() -> None:
    stub = FakeStub(rpc_error(grpc.StatusCode.UNAVAILABLE, "down"))
    async with await client_with(stub) as client:
        assert client.retry == RetryPolicy()
        with pytest.raises(
            Unavailable, match=r"^down \(gave up after 3 attempts in .*s: no attempts left\)$"
        ):
            await client.call("insurer/claims.check", {}, timeout=5)
    assert len(stub.requests) == 3


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    ],
)
async def test_non_transient_errors_are_not_retried(
    code: grpc.StatusCode, error_type: type
) -> None:
    stub = FakeStub(rpc_error(code, f"refused with {code.name}"), completed())
    async with await client_with(stub, retry=FAST) as client:
        with pytest.raises(error_type, match=f"^refused with {code.name}$"):
            await client.call("insurer/claims.check", {}, timeout=5)
    assert len(stub.requests) == 1


async def test_a_task_that_ran_and_failed_is_not_retried() -> None:
    failed = pb.TaskResult(
        task_id="t",
        state=pb.TASK_STATE_FAILED,
        error=pb.TaskError(code="skill_error", message="boom"),
    )
    stub = FakeStub(failed, completed())
    async with await client_with(stub, retry=FAST) as client:
        with pytest.raises(TaskFailed, match="task t failed: skill_error: boom"):
            await client.call("insurer/claims.check", {}, timeout=5)
    assert len(stub.requests) == 1


async def test_resource_exhausted_is_retried_only_when_the_policy_opts_in() -> None:
    limited = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "peer rate limit")
    stub = FakeStub(limited, completed(n=1))
    policy = RetryPolicy(initial_backoff=0.01, retry_on=(Unavailable, ResourceExhausted))
    async with await client_with(stub) as client:
        assert (await client.call("insurer/claims.check", {}, retry=policy)).output == {"n": 1}
    assert len(stub.requests) == 2


async def test_retries_stop_inside_the_deadline() -> None:
    stub = FakeStub(rpc_error(grpc.StatusCode.UNAVAILABLE, "down"))
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.1)
    async with await client_with(stub) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="the deadline leaves no time for another"):
            await client.call("insurer/claims.check", {}, timeout=0.6, retry=policy)
        elapsed = time.monotonic() - started
    # never past the call's deadline, but for how late a busy machine wakes the last backoff
    assert elapsed < 0.6 + 0.5
    assert 2 <= len(stub.requests) < 1000
    assert all(t is not None and 0 < t <= 0.6 for t in stub.timeouts)


async def test_no_attempt_starts_after_a_backoff_that_woke_too_late() -> None:
    from participant_sdk._patterns import MIN_ATTEMPT_SECONDS, call_with_retry

    timeouts: list[float | None] = []

    async def attempt(remaining: float | None) -> str:
        timeouts.append(remaining)
        raise Unavailable("down")

    async def late_sleep(seconds: float) -> None:  # the loop was busy: woken 0.3 s late
        await asyncio.sleep(seconds + 0.3)

    policy = RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=0.05)
    deadline = time.monotonic() + 0.35
    with pytest.raises(Unavailable, match="^down$"):  # one attempt: its own error, as it was
        await call_with_retry(attempt, policy, deadline=deadline, sleep=late_sleep, rand=lambda: 1)
    assert len(timeouts) == 1, f"no attempt with less than {MIN_ATTEMPT_SECONDS} s left"


async def test_retry_sleeps_are_full_jitter_and_bounded() -> None:
    from participant_sdk._patterns import call_with_retry

    slept: list[float] = []
    calls = 0

    async def attempt(remaining: float | None) -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise Unavailable("down")
        return "ok"

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.3, multiplier=2)
    assert (
        await call_with_retry(attempt, policy, deadline=None, sleep=sleep, rand=lambda: 1.0) == "ok"
    )
    assert slept == pytest.approx([0.1, 0.2, 0.3, 0.3])


@settings(deadline=None)  # no per-example timer: a stalled machine is not a failure
@given(
    retry=st.integers(min_value=1, max_value=60),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
    initial=st.floats(min_value=0, max_value=5),
    cap=st.floats(min_value=0, max_value=30),
)
def test_jitter_stays_between_zero_and_the_capped_exponential(
    retry: int, rand: float, initial: float, cap: float
) -> None:
    policy = RetryPolicy(initial_backoff=initial, max_backoff=cap)
    delay = policy.backoff(retry, lambda: rand)
    assert 0 <= delay <= min(cap, initial * 2 ** (retry - 1)) + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1, not 0"),
        ({"initial_backoff": -1}, "must not be negative"),
        ({"multiplier": 0.5}, "multiplier must be at least 1, not 0.5"),
        ({"retry_on": (PermissionDenied,)}, "PermissionDenied is never retried"),
        ({"retry_on": (DeadlineExceeded,)}, "DeadlineExceeded is never retried"),
        ({"retry_on": (TaskFailed,)}, "TaskFailed is never retried"),
        ({"retry_on": (FedgateError,)}, "FedgateError is never retried"),
        ({"retry_on": (ValueError,)}, "retry_on takes FedgateError subclasses"),
    ],
)
def test_a_bad_retry_policy_is_refused_where_it_is_made(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        RetryPolicy(**kwargs)


# ---- a fake caller for fallback and fan-out --------------------------------------------------


@dataclass
class Behaviour:
    delay: float = 0.0
    output: dict[str, Any] | None = None
    error: FedgateError | None = None


@dataclass
class FakeCaller:
    """Answers per target after a delay; a cancel ends the target's task as canceled."""

    behaviours: dict[str, Behaviour]
    calls: list[tuple[str, float | None, str | None]] = field(default_factory=list)
    cancels: list[tuple[str, str]] = field(default_factory=list)
    _events: dict[str, asyncio.Event] = field(default_factory=dict)

    async def call(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - Client.call's signature
        task_id: str | None = None,
        idempotency_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> TaskResult:
        self.calls.append((target, timeout, idempotency_key))
        task_id = task_id or f"task-{target}"
        behaviour = self.behaviours[target]
        cancelled = self._events.setdefault(task_id, asyncio.Event())
        waited = behaviour.delay if timeout is None else min(behaviour.delay, timeout)
        try:
            await asyncio.wait_for(cancelled.wait(), waited)
            raise TaskFailed(TaskResult(task_id, "canceled"))
        except TimeoutError:
            pass
        if timeout is not None and behaviour.delay > timeout:
            raise DeadlineExceeded(f"{target}: deadline exceeded")
        if behaviour.error is not None:
            raise behaviour.error
        return TaskResult(task_id, "completed", output=behaviour.output or {})

    async def cancel(self, task_id: str, reason: str = "") -> str:
        self.cancels.append((task_id, reason))
        self._events.setdefault(task_id, asyncio.Event()).set()
        return "canceled"


def failed(state: str, code: str = "skill_error") -> TaskFailed:
    from participant_sdk import TaskError

    return TaskFailed(TaskResult("t", state, error=TaskError(code, f"{code} happened")))


# ---- fallback routes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("organization 'a' is unreachable"),
        PermissionDenied("not shared with organization 'hospital'"),
        NotFound("agent 'claims' is not connected"),
        ResourceExhausted("peer rate limit"),
        failed("failed"),
        failed("rejected", "policy"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_call_first_falls_back_on_a_refusal(error: FedgateError) -> None:
    caller = FakeCaller(
        {
            "a/claims.check": Behaviour(error=error),
            "b/claims.check": Behaviour(output={"approved": True}),
        }
    )
    from participant_sdk._patterns import call_first

    outcome = await call_first(caller, ["a/claims.check", "b/claims.check"], {}, timeout=5)
    assert outcome.target == "b/claims.check"
    assert outcome.output == {"approved": True}
    assert outcome.attempts == (("a/claims.check", error),)


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("task input is nested deeper than 32"),
        Unauthenticated("the result carries no receipt"),
        failed("canceled", "canceled"),
    ],
    ids=lambda e: type(e).__name__ + getattr(getattr(e, "result", None), "state", ""),
)
async def test_call_first_stops_on_an_error_that_is_not_a_refusal(error: FedgateError) -> None:
    from participant_sdk._patterns import call_first

    caller = FakeCaller({"a/x.y": Behaviour(error=error), "b/x.y": Behaviour(output={})})
    with pytest.raises(type(error)) as info:
        await call_first(caller, ["a/x.y", "b/x.y"], {}, timeout=5)
    assert info.value is error
    assert [c[0] for c in caller.calls] == ["a/x.y"]


async def test_call_first_raises_all_routes_failed_with_every_attempt() -> None:
    from participant_sdk._patterns import call_first

    down = Unavailable("organization 'a' is unreachable")
    denied = PermissionDenied("agent skill claims.check of 'b' is not shared")
    caller = FakeCaller(
        {"a/claims.check": Behaviour(error=down), "b/claims.check": Behaviour(error=denied)}
    )
    with pytest.raises(AllRoutesFailed) as info:
        await call_first(caller, ["a/claims.check", "b/claims.check"], {}, timeout=5)
    assert info.value.attempts == (("a/claims.check", down), ("b/claims.check", denied))
    assert str(info.value) == (
        "all 2 routes failed: a/claims.check: Unavailable: organization 'a' is unreachable; "
        "b/claims.check: PermissionDenied: agent skill claims.check of 'b' is not shared"
    )


async def test_call_first_shares_one_deadline() -> None:
    from participant_sdk._patterns import call_first

    caller = FakeCaller(
        {
            "a/x.y": Behaviour(delay=0.3, error=Unavailable("slow then down")),
            "b/x.y": Behaviour(output={"ok": 1}),
        }
    )
    await call_first(caller, ["a/x.y", "b/x.y"], {}, timeout=1.0)
    (_, first, _), (_, second, _) = caller.calls
    assert first is not None and second is not None
    assert first <= 1.0 and second <= first - 0.25, "the second route gets what the first left"


async def test_call_first_deadline_names_the_routes_tried_and_not_tried() -> None:
    from participant_sdk._patterns import call_first

    caller = FakeCaller({"a/x.y": Behaviour(delay=5, output={}), "b/x.y": Behaviour(output={})})
    with pytest.raises(DeadlineExceeded) as info:
        await call_first(caller, ["a/x.y", "b/x.y"], {}, timeout=0.2)
    assert "the deadline of 0.2s passed before any route answered" in info.value.message
    assert "tried: a/x.y: DeadlineExceeded" in info.value.message
    assert "not tried: b/x.y" in info.value.message


async def test_route_timeout_moves_on_from_a_slow_route() -> None:
    from participant_sdk._patterns import call_first

    caller = FakeCaller(
        {"a/x.y": Behaviour(delay=5, output={}), "b/x.y": Behaviour(output={"ok": 1})}
    )
    outcome = await call_first(caller, ["a/x.y", "b/x.y"], {}, timeout=5, route_timeout=0.2)
    assert outcome.target == "b/x.y"
    assert isinstance(outcome.attempts[0][1], DeadlineExceeded)


async def test_call_first_derives_one_idempotency_key_per_route() -> None:
    from participant_sdk._patterns import call_first

    caller = FakeCaller(
        {"a/x.y": Behaviour(error=Unavailable("down")), "b/x.y": Behaviour(output={})}
    )
    await call_first(caller, ["a/x.y", "b/x.y"], {}, idempotency_key="claim-7")
    assert [c[2] for c in caller.calls] == ["claim-7:a:x.y", "claim-7:b:x.y"]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([], "call_first needs at least one target"),
        ("a/x.y", "takes a list of targets, not the string 'a/x.y'"),
        (["a/x.y", "a/x.y"], "lists a/x.y more than once"),
        (["a-x-y"], "expected 'org/agent.skill'"),
    ],
)
async def test_call_first_refuses_bad_targets_before_calling(targets: Any, message: str) -> None:
    from participant_sdk._patterns import call_first

    caller = FakeCaller({})
    with pytest.raises(InvalidArgument, match=message):
        await call_first(caller, targets, {})
    assert caller.calls == []


# ---- fan-out strategies over synthetic results ----------------------------------------------


def answers(**outputs: dict[str, Any]) -> dict[str, TaskResult]:
    return {
        f"{name}/stock.check": TaskResult("t", "completed", output=o) for name, o in outputs.items()
    }


def test_majority_agreement_reports_the_dissenter() -> None:
    results = answers(a={"in_stock": True}, b={"in_stock": True}, c={"in_stock": False})
    report = resolve_quorum(majority("in_stock"), list(results), results, {})
    assert report.agreed and report.value is True
    assert report.conflicts == {
        "true": ("a/stock.check", "b/stock.check"),
        "false": ("c/stock.check",),
    }
    assert report.describe().splitlines() == [
        "majority(in_stock): agreed on true",
        "  true from a/stock.check, b/stock.check",
        "  false from c/stock.check",
    ]


def test_unanimous_answers_have_no_conflicts() -> None:
    results = answers(a={"stock": {"in_stock": 3}}, b={"stock": {"in_stock": 3}})
    report = resolve_quorum(quorum("stock.in_stock", 2), list(results), results, {})
    assert report.value == 3 and report.conflicts == {}


def test_majority_tie_is_no_agreement() -> None:
    results = answers(pricing={"in_stock": True}, inventory={"in_stock": False})
    with pytest.raises(NoAgreement) as info:
        resolve_quorum(majority("in_stock"), list(results), results, {})
    assert str(info.value).splitlines()[0] == (
        "majority(in_stock): no value reached 2 of 2 targets (best: 1, a tie; 0 failed, "
        "0 without the field)"
    )
    report = info.value.report
    assert not report.agreed and report.value is None
    assert report.conflicts == {
        "true": ("pricing/stock.check",),
        "false": ("inventory/stock.check",),
    }


def test_quorum_not_reached_counts_failures_and_missing_fields() -> None:
    results = answers(a={"in_stock": True}, b={"price": 3})
    targets = [*results, "c/stock.check"]
    errors: dict[str, FedgateError] = {
        "c/stock.check": Unavailable("organization 'c' is unreachable")
    }
    with pytest.raises(NoAgreement) as info:
        resolve_quorum(quorum("in_stock", 2), targets, results, errors)
    assert str(info.value).splitlines() == [
        "quorum(in_stock, 2): no value reached 2 of 3 targets "
        "(best: 1; 1 failed, 1 without the field)",
        "quorum(in_stock, 2): no agreement",
        "  true from a/stock.check",
        "  no value from b/stock.check (field absent or withheld)",
        "  c/stock.check failed: Unavailable: organization 'c' is unreachable",
    ]
    assert info.value.report.missing == ("b/stock.check",)


def test_two_values_reaching_a_low_quorum_is_no_agreement() -> None:
    results = answers(a={"v": 1}, b={"v": 2})
    with pytest.raises(NoAgreement, match="2 different values each reached 1 of 2 targets"):
        resolve_quorum(quorum("v", 1), list(results), results, {})


def test_values_are_grouped_by_json_so_true_and_one_differ() -> None:
    results = answers(a={"v": True}, b={"v": 1.0}, c={"v": {"x": [1, 2]}}, d={"v": {"x": [1, 2]}})
    report = resolve_quorum(quorum("v", 2), list(results), results, {})
    assert report.value == {"x": [1, 2]}
    assert set(report.conflicts) == {'{"x":[1,2]}', "true", "1.0"}


@pytest.mark.parametrize(
    ("output", "path", "expected"),
    [
        ({"a": {"b": 1}}, "a.b", 1),
        ({"items": [{"price": 2}]}, "items.0.price", 2),
        ({"a": None}, "a", None),
    ],
)
def test_field_value_walks_dotted_paths(output: dict[str, Any], path: str, expected: Any) -> None:
    assert field_value(output, path) == expected


@pytest.mark.parametrize(("output", "path"), [({"a": 1}, "a.b"), ({}, "a"), ({"l": [1]}, "l.3")])
def test_field_value_reports_missing(output: dict[str, Any], path: str) -> None:
    from participant_sdk._patterns import _MISSING

    assert field_value(output, path) is _MISSING


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: quorum("in_stock", 0), "a quorum needs at least 1 agreeing target, not 0"),
        (lambda: majority(""), "field path '' is not valid"),
        (lambda: majority("a..b"), "field path 'a..b' is not valid"),
    ],
)
def test_bad_strategies_are_refused_where_they_are_made(
    make: Callable[[], Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make()


# ---- fan-out over a fake caller -------------------------------------------------------------


async def test_first_success_cancels_the_rest() -> None:
    from participant_sdk._patterns import fan_out

    caller = FakeCaller(
        {
            "a/x.y": Behaviour(delay=0.05, output={"n": 1}),
            "b/x.y": Behaviour(delay=10, output={"n": 2}),
            "c/x.y": Behaviour(error=Unavailable("down")),
        }
    )
    started = time.monotonic()
    report = await fan_out(
        caller, ["a/x.y", "b/x.y", "c/x.y"], {}, strategy="first_success", timeout=20
    )
    assert time.monotonic() - started < 2
    assert report.winner == "a/x.y" and list(report.results) == ["a/x.y"]
    assert [reason for _, reason in caller.cancels] == ["a/x.y answered first"]
    assert isinstance(report.errors["b/x.y"], TaskFailed)
    assert report.errors["b/x.y"].result.state == "canceled"
    assert isinstance(report.errors["c/x.y"], Unavailable)


async def test_first_success_cancels_locally_when_the_gateway_does_not_answer_the_cancel() -> None:
    from participant_sdk._patterns import fan_out

    class Deaf(FakeCaller):
        async def cancel(self, task_id: str, reason: str = "") -> str:
            self.cancels.append((task_id, reason))
            raise NotFound(f"task {task_id!r} is not known")

    caller = Deaf({"a/x.y": Behaviour(output={}), "b/x.y": Behaviour(delay=10, output={})})
    report = await fan_out(
        caller, ["a/x.y", "b/x.y"], {}, strategy="first_success", cancel_grace=0.1
    )
    error = report.errors["b/x.y"]
    assert isinstance(error, Cancelled) and error.message == "canceled: 'a/x.y' answered first"


async def test_first_success_with_no_success_raises_fan_out_failed() -> None:
    from participant_sdk._patterns import fan_out

    caller = FakeCaller(
        {
            "a/x.y": Behaviour(error=Unavailable("a down")),
            "b/x.y": Behaviour(error=PermissionDenied("b says no")),
        }
    )
    with pytest.raises(FanOutFailed) as info:
        await fan_out(caller, ["a/x.y", "b/x.y"], {}, strategy="first_success")
    assert str(info.value).splitlines() == [
        "first_success: none of the 2 targets completed",
        "first_success: 0 answered, 2 failed",
        "  a/x.y failed: Unavailable: a down",
        "  b/x.y failed: PermissionDenied: b says no",
    ]


async def test_all_waits_for_every_target_and_reports_each() -> None:
    from participant_sdk._patterns import fan_out

    caller = FakeCaller(
        {
            "a/x.y": Behaviour(delay=0.1, output={"n": 1}),
            "b/x.y": Behaviour(error=Unavailable("b down")),
            "c/x.y": Behaviour(output={"n": 3}),
        }
    )
    report = await fan_out(caller, ["a/x.y", "b/x.y", "c/x.y"], {}, strategy="all")
    assert list(report.results) == ["a/x.y", "c/x.y"] and list(report.errors) == ["b/x.y"]
    assert not report.ok and caller.cancels == []
    assert len({c[2] for c in caller.calls}) == 3, "one idempotency key per target"


async def test_majority_over_a_fake_caller_counts_a_timeout_as_a_failure() -> None:
    from participant_sdk._patterns import fan_out

    caller = FakeCaller(
        {
            "a/x.y": Behaviour(output={"in_stock": True}),
            "b/x.y": Behaviour(output={"in_stock": True}),
            "c/x.y": Behaviour(delay=10, output={"in_stock": False}),
        }
    )
    report = await fan_out(
        caller, ["a/x.y", "b/x.y", "c/x.y"], {}, strategy=majority("in_stock"), timeout=0.3
    )
    assert report.value is True
    assert isinstance(report.errors["c/x.y"], DeadlineExceeded)


@pytest.mark.parametrize(
    ("targets", "strategy", "message"),
    [
        (["a/x.y"], "fastest", "unknown fan-out strategy 'fastest'"),
        (["a/x.y", "b/x.y"], quorum("v", 3), r"quorum\(v, 3\) can never be reached with 2 targets"),
        ([], "all", "fan_out needs at least one target"),
        (["a/x.y", "a/x.y"], "all", "lists a/x.y more than once"),
    ],
)
async def test_fan_out_refuses_what_cannot_work_before_calling(
    targets: list[str], strategy: Any, message: str
) -> None:
    from participant_sdk._patterns import fan_out

    caller = FakeCaller({})
    with pytest.raises(InvalidArgument, match=message):
        await fan_out(caller, targets, {}, strategy=strategy)
    assert caller.calls == []
