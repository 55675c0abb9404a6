"""A load generator written only on the public SDK (`participant_sdk`), as an outside caller would.

`callers` concurrent callers each make logical requests one after another, for `seconds`. A
logical request has its own idempotency key; it is called, and re-called with the same key while
the answer is UNAVAILABLE (a gateway restarting, a partner unreachable), until it gets another
answer or `give_up_after` passes. A caller that keeps only its key gets a new task id on every
attempt (`new_task_id_per_attempt`, the default: an A2A client, a job runner that restarted, a
person retrying); otherwise every attempt repeats the first task id.

It imports nothing from the gateway, so it runs against any Fedgate deployment:

    python -m tests.chaos.load --gateway 127.0.0.1:7400 --target hospital/slow.wait --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from participant_sdk import (
    Client,
    FedgateError,
    RetryPolicy,
    TaskFailed,
    TaskResult,
    Unavailable,
)

# One attempt, as the SDK made it: no retries of its own, the load generator re-calls.
ONE_ATTEMPT = RetryPolicy(max_attempts=1)


@dataclass
class Attempt:
    """One call of a logical request: the task id it sent and what came back."""

    task_id: str
    outcome: str  # "completed", "TaskFailed:<state>:<code>", or the SDK error's class name
    result: TaskResult | None = None
    error: FedgateError | None = None


@dataclass
class LogicalRequest:
    """A request with its own idempotency key, and every attempt made for it."""

    key: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def outcome(self) -> str:
        return self.final.outcome if self.attempts else "not called"

    @property
    def result(self) -> TaskResult | None:
        """The result it ended with (completed, or the TaskFailed's), if any."""
        return self.final.result if self.attempts else None

    @property
    def task_ids(self) -> list[str]:
        return [attempt.task_id for attempt in self.attempts]


@dataclass
class LoadReport:
    requests: list[LogicalRequest]
    seconds: float

    def outcomes(self) -> collections.Counter[str]:
        return collections.Counter(request.outcome for request in self.requests)

    def attempts(self) -> collections.Counter[str]:
        return collections.Counter(a.outcome for r in self.requests for a in r.attempts)

    def not_completed(self) -> dict[str, str]:
        return {r.key: r.outcome for r in self.requests if r.outcome != "completed"}

    def describe(self) -> str:
        """Counts of outcomes and attempts, and one message for each kind of error."""
        recalled = sum(1 for r in self.requests if len(r.attempts) > 1)
        examples: dict[str, str] = {}
        for attempt in (a for r in self.requests for a in r.attempts):
            if attempt.error is not None:
                examples.setdefault(attempt.outcome, attempt.error.message)
        lines = [
            f"{len(self.requests)} logical requests in {self.seconds:.1f}s, {recalled} re-called; "
            f"outcomes {dict(self.outcomes())}; attempts {dict(self.attempts())}",
            *(f"  {outcome}, e.g.: {message}" for outcome, message in sorted(examples.items())),
        ]
        return "\n".join(lines)


def _outcome(error: FedgateError) -> str:
    if isinstance(error, TaskFailed):
        code = error.result.error.code if error.result.error else ""
        return f"TaskFailed:{error.result.state}:{code}"
    return type(error).__name__


async def logical_request(
    client: Client,
    target: str,
    key: str,
    data: dict[str, Any],
    *,
    attempt_timeout: float = 10.0,
    give_up_after: float = 60.0,
    recall_after: float = 0.2,
    new_task_id_per_attempt: bool = True,
) -> LogicalRequest:
    """Call `target` with idempotency key `key`, re-calling while the answer is UNAVAILABLE."""
    request = LogicalRequest(key)
    give_up = time.monotonic() + give_up_after
    task_id = str(uuid.uuid4())
    while True:
        if new_task_id_per_attempt and request.attempts:
            task_id = str(uuid.uuid4())
        try:
            result = await client.call(
                target,
                data,
                timeout=attempt_timeout,
                task_id=task_id,
                idempotency_key=key,
                retry=ONE_ATTEMPT,
            )
            request.attempts.append(Attempt(task_id, "completed", result=result))
            return request
        except TaskFailed as exc:
            request.attempts.append(Attempt(task_id, _outcome(exc), result=exc.result, error=exc))
            return request
        except Unavailable as exc:
            request.attempts.append(Attempt(task_id, _outcome(exc), error=exc))
            if time.monotonic() + recall_after >= give_up:
                return request
        except FedgateError as exc:
            request.attempts.append(Attempt(task_id, _outcome(exc), error=exc))
            return request
        await asyncio.sleep(recall_after)


async def run_load(
    gateway: str,
    target: str,
    *,
    payload: Callable[[str], dict[str, Any]],
    callers: int = 16,
    seconds: float = 5.0,
    key_prefix: str = "load",
    requester: str = "load-generator",
    token: str | None = None,
    attempt_timeout: float = 10.0,
    give_up_after: float = 60.0,
    recall_after: float = 0.2,
    new_task_id_per_attempt: bool = True,
    running: asyncio.Event | None = None,
) -> LoadReport:
    """`callers` callers making logical requests for `seconds`; every request is seen to its end.

    No new logical request starts after `seconds`; the ones under way go on (re-calls included)
    until they end or `give_up_after` passes. `running` is set once every caller has finished
    its first logical request (the load is flowing).
    """
    requests: list[LogicalRequest] = []
    started = time.monotonic()
    stop_at = started + seconds
    first_done = 0

    async def caller(number: int) -> None:
        nonlocal first_done
        count = 0
        while time.monotonic() < stop_at:
            key = f"{key_prefix}-{number}-{count}"
            count += 1
            request = await logical_request(
                client,
                target,
                key,
                payload(key),
                attempt_timeout=attempt_timeout,
                give_up_after=give_up_after,
                recall_after=recall_after,
                new_task_id_per_attempt=new_task_id_per_attempt,
            )
            requests.append(request)
            if count == 1:
                first_done += 1
                if first_done == callers and running is not None:
                    running.set()

    async with Client(gateway, requester=requester, token=token, retry=ONE_ATTEMPT) as client:
        await asyncio.gather(*(caller(n) for n in range(callers)))
    return LoadReport(requests, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", default="127.0.0.1:7400", help="the local participant port")
    parser.add_argument("--target", required=True, help="org/agent.skill")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--skill-seconds", type=float, default=0.5, help="'seconds' in the input")
    parser.add_argument("--token", default=None)
    parser.add_argument("--same-task-id", action="store_true", help="re-call with the first id")
    args = parser.parse_args()
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    report = asyncio.run(
        run_load(
            args.gateway,
            args.target,
            payload=lambda key: {"key": key, "seconds": args.skill_seconds},
            callers=args.callers,
            seconds=args.seconds,
            key_prefix=prefix,
            token=args.token,
            new_task_id_per_attempt=not args.same_task_id,
        )
    )
    print(report.describe())
    for key, outcome in sorted(report.not_completed().items()):
        print(f"  {key}: {outcome}")


if __name__ == "__main__":
    main()
