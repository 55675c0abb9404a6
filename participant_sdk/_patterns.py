"""Fault tolerance and orchestration for requesters: retries, fallback routes, fan-out.

    RetryPolicy       retry transient failures of one call, inside its deadline
    call_first        try routes in order until one answers        -> FallbackResult
    fan_out           call several agents at once, then resolve    -> FanOutResult

Errors added to the SDK's tree (client-side outcomes, so no gRPC status of their own):

    FedgateError
    ├── AllRoutesFailed    every route of `call_first` refused or failed (carries each attempt)
    └── FanOutFailed       a fan-out strategy could not be satisfied (carries the report)
        └── NoAgreement    quorum / majority not reached, or several values reached it

What counts as what (the contract, also in the README):
- transient, retried by RetryPolicy: UNAVAILABLE (peer or gateway unreachable, a reset
  connection, a gateway shutting down, an audit store briefly down); RESOURCE_EXHAUSTED only when
  the policy opts in. Never retried: PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT,
  DEADLINE_EXCEEDED, UNAUTHENTICATED, CANCELLED, and a task that ran and ended failed, rejected or
  canceled (TaskFailed).
- a refusal, on which `call_first` moves to the next route: UNAVAILABLE, PERMISSION_DENIED,
  NOT_FOUND, RESOURCE_EXHAUSTED, TaskFailed in state failed or rejected, and DEADLINE_EXCEEDED of
  one route cut short by `route_timeout` while the overall deadline still has time. Anything else
  (INVALID_ARGUMENT: our input is bad for every route; UNAUTHENTICATED: our credential, or a
  responder whose receipt does not verify; a task canceled on purpose; the overall deadline) stops
  at once and is raised as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fedgate.convert import parse_target

from participant_sdk._errors import (
    Cancelled,
    DeadlineExceeded,
    FedgateError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SkillDefinitionError,
    TaskFailed,
    Unauthenticated,
    Unavailable,
)
from participant_sdk._types import TaskResult

# ---- retries ----------------------------------------------------------------------------------

# Errors that mean "this will not get better by asking again", whatever a policy says.
NEVER_RETRIED: tuple[type[FedgateError], ...] = (
    PermissionDenied,
    NotFound,
    InvalidArgument,
    DeadlineExceeded,
    Unauthenticated,
    Cancelled,
    TaskFailed,
    SkillDefinitionError,
)
# An attempt started with less time than this left would only end in DEADLINE_EXCEEDED.
MIN_ATTEMPT_SECONDS = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures with exponential backoff and full jitter, inside the deadline.

    Every attempt of one logical call sends the same task id and idempotency key, so the gateways
    run it at most once. The n-th retry waits a random time in [0, min(max_backoff,
    initial_backoff * multiplier ** (n - 1))] ("full jitter"), and no retry starts when the call's
    deadline would not leave it time: the remaining time shrinks, it is never extended.
    `RetryPolicy(max_attempts=1)` turns retries off.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_on: tuple[type[FedgateError], ...] = (Unavailable,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise InvalidArgument("initial_backoff and max_backoff must not be negative")
        if self.multiplier < 1:
            raise InvalidArgument(f"multiplier must be at least 1, not {self.multiplier}")
        for error_type in self.retry_on:
            if not (isinstance(error_type, type) and issubclass(error_type, FedgateError)):
                raise InvalidArgument(f"retry_on takes FedgateError subclasses, not {error_type!r}")
            if error_type is FedgateError or issubclass(error_type, NEVER_RETRIED):
                raise InvalidArgument(
                    f"{error_type.__name__} is never retried: it does not go away by asking again "
                    "(retry_on may hold Unavailable and ResourceExhausted)"
                )

    def retries(self, error: FedgateError) -> bool:
        """Whether `error` is one this policy retries (never one of NEVER_RETRIED)."""
        return isinstance(error, self.retry_on) and not isinstance(error, NEVER_RETRIED)

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry): full jitter."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, retry - 1))
        return cap * rand()


async def call_with_retry(
    attempt: Callable[[float | None], Any],
    policy: RetryPolicy,
    *,
    deadline: float | None,
    sleep: Callable[[float], Any] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> Any:
    """Run `attempt(timeout)` until it succeeds, fails for good, or the deadline leaves no time.

    `deadline` is on the `time.monotonic()` clock (None: no deadline). The error of the last
    attempt is raised; after retries its message says how many attempts were made and why it
    stopped, and it keeps its type (Unavailable stays Unavailable).
    """
    started = time.monotonic()
    number = 1
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            return await attempt(remaining)
        except FedgateError as error:
            if not policy.retries(error):
                raise
            elapsed = time.monotonic() - started
            if number >= policy.max_attempts:
                raise _gave_up(error, number, elapsed, "no attempts left") from None
            delay = policy.backoff(number, rand)
            why = "the deadline leaves no time for another"
            if deadline is not None and time.monotonic() + delay > deadline - MIN_ATTEMPT_SECONDS:
                raise _gave_up(error, number, elapsed, why) from None
            await sleep(delay)
            if deadline is not None and deadline - time.monotonic() < MIN_ATTEMPT_SECONDS:
                # Woken late (a busy event loop): an attempt now could not finish in time.
                raise _gave_up(error, number, time.monotonic() - started, why) from None
            number += 1


def _gave_up(error: FedgateError, attempts: int, elapsed: float, why: str) -> FedgateError:
    if attempts == 1:
        return error
    again = type(error)(
        f"{error.message} (gave up after {attempts} attempts in {elapsed:.2f}s: {why})"
    )
    again.status = error.status
    return again


# ---- what a requester needs from a client ----------------------------------------------------


class Caller(Protocol):
    """The two calls the patterns need; `Client` is one, a test's fake is another."""

    async def call(
        self,
        target: str,
        data: dict[str, Any],
        *,
        timeout: float | None = ...,  # noqa: ASYNC109 - the deadline travels to the gateways
        task_id: str | None = ...,
        idempotency_key: str | None = ...,
        retry: RetryPolicy | None = ...,
    ) -> TaskResult: ...

    async def cancel(self, task_id: str, reason: str = ...) -> str: ...


def _check_targets(targets: Sequence[str], what: str) -> list[str]:
    if isinstance(targets, str):
        raise InvalidArgument(f"{what} takes a list of targets, not the string {targets!r}")
    targets = list(targets)
    if not targets:
        raise InvalidArgument(f"{what} needs at least one target")
    for target in targets:
        try:
            parse_target(target)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise InvalidArgument(
            f"{what} lists {', '.join(duplicates)} more than once: name each target once"
        )
    return targets


def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {getattr(error, 'message', str(error))}"


# ---- fallback routes ------------------------------------------------------------------------


@dataclass(frozen=True)
class FallbackResult:
    """The first route that answered, and every route tried before it with why it failed."""

    result: TaskResult
    target: str
    attempts: tuple[tuple[str, FedgateError], ...] = ()

    @property
    def output(self) -> dict[str, Any]:
        return self.result.output


class AllRoutesFailed(FedgateError):
    """Every route of `call_first` refused or failed; `attempts` holds (target, error) for each."""

    def __init__(self, attempts: Sequence[tuple[str, FedgateError]]) -> None:
        self.attempts = tuple(attempts)
        lines = "; ".join(f"{target}: {_describe_error(error)}" for target, error in self.attempts)
        super().__init__(f"all {len(self.attempts)} routes failed: {lines}")


def is_refusal(error: FedgateError) -> bool:
    """Whether `call_first` moves on to the next route after `error` (see the module docstring)."""
    if isinstance(error, TaskFailed):
        return error.result.state in ("failed", "rejected")
    return isinstance(error, Unavailable | PermissionDenied | NotFound | ResourceExhausted)


async def call_first(
    caller: Caller,
    targets: Sequence[str],
    data: dict[str, Any],
    *,
    timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
    route_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    idempotency_key: str | None = None,
) -> FallbackResult:
    """Try `targets` in order, all within one deadline; return the first that completes."""
    targets = _check_targets(targets, "call_first")
    if route_timeout is not None and route_timeout <= 0:
        raise InvalidArgument(f"route_timeout must be positive, not {route_timeout}")
    deadline = None if timeout is None else time.monotonic() + timeout
    attempts: list[tuple[str, FedgateError]] = []
    for target in targets:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(_deadline_message(timeout, attempts, targets))
        budget = remaining
        if route_timeout is not None:
            budget = route_timeout if remaining is None else min(remaining, route_timeout)
        # One key per route (a gateway key allows letters, digits and '.', '_', ':', '-').
        key = f"{idempotency_key}:{target.replace('/', ':')}" if idempotency_key else None
        try:
            result = await caller.call(
                target, data, timeout=budget, idempotency_key=key, retry=retry
            )
        except DeadlineExceeded as error:
            left = None if deadline is None else deadline - time.monotonic()
            if route_timeout is not None and (left is None or left > MIN_ATTEMPT_SECONDS):
                attempts.append((target, error))  # cut short by route_timeout: next route
                continue
            attempts.append((target, error))
            raise DeadlineExceeded(_deadline_message(timeout, attempts, targets)) from None
        except FedgateError as error:
            if not is_refusal(error):
                raise
            attempts.append((target, error))
            continue
        return FallbackResult(result, target, tuple(attempts))
    raise AllRoutesFailed(attempts)


def _deadline_message(
    timeout: float | None, attempts: Sequence[tuple[str, FedgateError]], targets: Sequence[str]
) -> str:
    tried = "; ".join(f"{t}: {_describe_error(e)}" for t, e in attempts) or "none"
    untried = [t for t in targets if t not in {t for t, _ in attempts}]
    return (
        f"the deadline of {timeout}s passed before any route answered; tried: {tried}; "
        f"not tried: {', '.join(untried) or 'none'}"
    )


# ---- fan-out --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quorum:
    """Agreement on the value of one output field: at least `n` targets, or a strict majority."""

    field: str
    n: int | None = None  # None: more than half of the targets asked

    def __post_init__(self) -> None:
        if not self.field or any(not part for part in self.field.split(".")):
            raise InvalidArgument(
                f"field path {self.field!r} is not valid: use dotted names like 'stock.in_stock'"
            )
        if self.n is not None and self.n < 1:
            raise InvalidArgument(f"a quorum needs at least 1 agreeing target, not {self.n}")

    def needed(self, targets: int) -> int:
        return self.n if self.n is not None else targets // 2 + 1

    def __str__(self) -> str:
        return f"majority({self.field})" if self.n is None else f"quorum({self.field}, {self.n})"


def quorum(field_path: str, n: int) -> Quorum:
    """At least `n` targets must return the same value at `field_path` (a dotted path)."""
    return Quorum(field_path, n)


def majority(field_path: str) -> Quorum:
    """More than half of the targets asked must return the same value at `field_path`."""
    return Quorum(field_path, None)


Strategy = Literal["first_success", "all"] | Quorum


@dataclass(frozen=True)
class Answer:
    """One value of the voted field, and the targets that returned it."""

    value: Any
    targets: tuple[str, ...]


@dataclass(frozen=True)
class FanOutResult:
    """What each target answered, and what the strategy made of it."""

    strategy: str
    results: dict[str, TaskResult] = field(default_factory=dict)
    errors: dict[str, FedgateError] = field(default_factory=dict)
    value: Any = None  # quorum / majority: the agreed value of the field
    winner: str | None = None  # first_success: the target whose answer was taken
    answers: tuple[Answer, ...] = ()  # quorum / majority: each distinct value, most backed first
    missing: tuple[str, ...] = ()  # answered, but without the field (absent, or withheld)
    agreed: bool = False  # quorum / majority: whether `value` is an agreed value

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def conflicts(self) -> dict[str, tuple[str, ...]]:
        """When targets disagree: each value (as compact JSON, `true` != `1`) -> who said it."""
        if len(self.answers) < 2:
            return {}
        return {_canonical(a.value): a.targets for a in self.answers}

    def describe(self) -> str:
        """A report a person can read: the decision, who said what, and who failed why."""
        if self.agreed:
            head = f"agreed on {_canonical(self.value)}"
        elif self.answers or self.missing:
            head = "no agreement"
        elif self.winner:
            head = f"took the answer of {self.winner}"
        else:
            head = f"{len(self.results)} answered, {len(self.errors)} failed"
        lines = [f"{self.strategy}: {head}"]
        lines += [f"  {_canonical(a.value)} from {', '.join(a.targets)}" for a in self.answers]
        if self.missing:
            lines.append(f"  no value from {', '.join(self.missing)} (field absent or withheld)")
        lines += [f"  {t} failed: {_describe_error(e)}" for t, e in self.errors.items()]
        return "\n".join(lines)


class FanOutFailed(FedgateError):
    """A fan-out strategy could not be satisfied; `report` says what each target answered."""

    def __init__(self, message: str, report: FanOutResult) -> None:
        super().__init__(f"{message}\n{report.describe()}")
        self.report = report


class NoAgreement(FanOutFailed):
    """Quorum or majority not reached (or reached by more than one value)."""


_MISSING = object()


def field_value(output: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` in `output` (numeric parts index lists), or `_MISSING`."""
    node: Any = output
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def resolve_quorum(
    rule: Quorum,
    targets: Sequence[str],
    results: Mapping[str, TaskResult],
    errors: Mapping[str, FedgateError],
) -> FanOutResult:
    """Group the answers by the field's value and apply the quorum; raise NoAgreement if unmet."""
    groups: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    missing: list[str] = []
    for target in targets:  # in the caller's order, so reports are stable
        result = results.get(target)
        if result is None:
            continue
        value = field_value(result.output, rule.field)
        if value is _MISSING:
            missing.append(target)
            continue
        key = _canonical(value)
        values.setdefault(key, value)
        groups.setdefault(key, []).append(target)
    answers = tuple(
        Answer(values[key], tuple(who))
        for key, who in sorted(groups.items(), key=lambda item: -len(item[1]))
    )
    needed = rule.needed(len(targets))
    winners = [a for a in answers if len(a.targets) >= needed]
    report = FanOutResult(
        str(rule),
        dict(results),
        dict(errors),
        value=winners[0].value if len(winners) == 1 else None,
        answers=answers,
        missing=tuple(missing),
        agreed=len(winners) == 1,
    )
    if len(winners) == 1:
        return report
    if winners:
        raise NoAgreement(
            f"{rule}: {len(winners)} different values each reached {needed} of {len(targets)} "
            "targets: raise the quorum or ask more targets",
            report,
        )
    best = len(answers[0].targets) if answers else 0
    tie = len(answers) > 1 and len(answers[1].targets) == best
    raise NoAgreement(
        f"{rule}: no value reached {needed} of {len(targets)} targets "
        f"(best: {best}{', a tie' if tie else ''}; {len(errors)} failed, "
        f"{len(missing)} without the field)",
        report,
    )


async def fan_out(
    caller: Caller,
    targets: Sequence[str],
    data: dict[str, Any],
    *,
    strategy: Strategy = "all",
    timeout: float | None = 30.0,  # noqa: ASYNC109 - the deadline travels to the gateways
    retry: RetryPolicy | None = None,
    cancel_grace: float = 2.0,
) -> FanOutResult:
    """Call every target concurrently with `data`, under one deadline, and apply `strategy`.

    - "first_success": the first target to complete wins; the others are canceled (their tasks
      are canceled at the gateways too) and reported in `errors`. FanOutFailed if none completes.
    - "all": wait for every target; never raises for a target's failure (see `errors`, `ok`).
    - quorum(field, n) / majority(field): wait for every target, group the answers by the value
      at `field`, return the value that reached the quorum, with every conflicting answer in
      `answers` / `conflicts`. NoAgreement (carrying the same report) when no single value does.
    """
    targets = _check_targets(targets, "fan_out")
    if not (strategy in ("first_success", "all") or isinstance(strategy, Quorum)):
        raise InvalidArgument(
            f"unknown fan-out strategy {strategy!r}: use 'first_success', 'all', quorum(field, n) "
            "or majority(field)"
        )
    if isinstance(strategy, Quorum) and strategy.needed(len(targets)) > len(targets):
        raise InvalidArgument(
            f"{strategy} can never be reached with {len(targets)} targets: "
            "ask more targets or lower n"
        )
    task_ids = {target: str(uuid.uuid4()) for target in targets}
    deadline = None if timeout is None else time.monotonic() + timeout

    async def one(target: str) -> TaskResult:
        left = None if deadline is None else max(0.001, deadline - time.monotonic())
        return await caller.call(
            target,
            data,
            timeout=left,
            task_id=task_ids[target],
            idempotency_key=task_ids[target],
            retry=retry,
        )

    running = {asyncio.ensure_future(one(t)): t for t in targets}
    results: dict[str, TaskResult] = {}
    errors: dict[str, FedgateError] = {}
    winner: str | None = None

    def collect(task: asyncio.Task[TaskResult]) -> None:
        target = running.pop(task)
        if task.cancelled():
            errors[target] = Cancelled(f"canceled: {winner!r} answered first")
            return
        error = task.exception()
        if error is None:
            results[target] = task.result()
        elif isinstance(error, FedgateError):
            errors[target] = error
        else:
            raise error

    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                collect(task)
            if strategy == "first_success" and results and winner is None:
                winner = next(t for t in targets if t in results)
                break
        if running:  # first_success: stop the others, at their gateways too
            await _cancel_rest(caller, running, task_ids, winner, deadline, cancel_grace, collect)
            for task in list(running):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                collect(task)
    finally:
        for task in running:
            task.cancel()
        for task in list(running):
            with contextlib.suppress(BaseException):
                await task

    ordered_results = {t: results[t] for t in targets if t in results}
    ordered_errors = {t: errors[t] for t in targets if t in errors}
    if isinstance(strategy, Quorum):
        return resolve_quorum(strategy, targets, ordered_results, ordered_errors)
    report = FanOutResult(strategy, ordered_results, ordered_errors, winner=winner)
    if strategy == "first_success" and winner is None:
        raise FanOutFailed(f"first_success: none of the {len(targets)} targets completed", report)
    return report


async def _cancel_rest(
    caller: Caller,
    running: dict[asyncio.Task[TaskResult], str],
    task_ids: Mapping[str, str],
    winner: str | None,
    deadline: float | None,
    grace: float,
    collect: Callable[[asyncio.Task[TaskResult]], None],
) -> None:
    """Cancel the tasks still running at their gateways, then give them a moment to end."""
    reason = f"{winner} answered first"

    async def cancel(target: str) -> None:
        # Already ended, never started there, or the gateway is slow to answer: the local
        # cancel below still ends our side, and the gateway cancels a task whose caller left.
        with contextlib.suppress(FedgateError, TimeoutError):
            await asyncio.wait_for(caller.cancel(task_ids[target], reason), max(0.1, grace))

    await asyncio.gather(*(cancel(t) for t in running.values()))
    wait = grace if deadline is None else max(0.0, min(grace, deadline - time.monotonic()))
    if wait > 0:
        done, _ = await asyncio.wait(running, timeout=wait)
        for task in done:
            collect(task)


__all__ = [
    "AllRoutesFailed",
    "Answer",
    "FallbackResult",
    "FanOutFailed",
    "FanOutResult",
    "NoAgreement",
    "Quorum",
    "RetryPolicy",
    "call_first",
    "call_with_retry",
    "fan_out",
    "majority",
    "quorum",
]
