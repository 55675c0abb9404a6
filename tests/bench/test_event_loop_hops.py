"""How many tasks, futures and thread hand-offs one exchange costs the gateways (issue 14,
"fewer hops through the event loop"): counted, not timed, over sequential exchanges between two
real gateways in one event loop, so a change that adds a hop shows here.

Per exchange, the gateways' own code (not grpc's, not the SDK's) may make at most:
- one task per gateway for the exchange itself (its Execution: it outlives the calls);
- per store step (two per gateway) one future and one hand-off from the writer thread;
- a future per call that follows the task, and the task's outcome;
- a future per message it waits for from its agent, and for the assignment it sends it (the
  responder's agent stream: the agent here sends a progress note and its result).

Measured before the rebuild of issue 14: three futures and a task wake-up per store step (a
queue to a writer task, a hop to the writer thread and back), a task and an asyncio.wait per
update relayed.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from typing import Any

from gateway.local import LocalFederation
from participant_sdk import Client
from tests.integration.federation import echo_agent, serving

EXCHANGES = 20


def _where(frame: Any) -> str:
    """The first frame of ours (gateway/) above the asyncio internals, if any."""
    while frame is not None:
        name = frame.f_code.co_filename
        if "/gateway/" in name:
            return name.rsplit("/gateway/", 1)[1] + ":" + frame.f_code.co_name
        frame = frame.f_back
    return ""


async def test_one_exchange_costs_the_gateways_a_bounded_number_of_hops(
    fed: LocalFederation,
) -> None:
    loop = asyncio.get_running_loop()
    futures: collections.Counter[str] = collections.Counter()
    tasks: collections.Counter[str] = collections.Counter()
    handoffs = 0
    create_future, call_soon_threadsafe = loop.create_future, loop.call_soon_threadsafe

    def counted_future() -> asyncio.Future[Any]:
        where = _where(sys._getframe(1))
        if where:
            futures[where] += 1
        return create_future()

    def counted_handoff(*args: Any, **kwargs: Any) -> Any:
        nonlocal handoffs
        if _where(sys._getframe(1)):
            handoffs += 1
        return call_soon_threadsafe(*args, **kwargs)

    def counted_task(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        code = getattr(coro, "cr_code", None)  # a task that runs our coroutine (not grpc's)
        if code is not None and "/gateway/" in code.co_filename:
            tasks[code.co_qualname] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with (
        serving(fed.participant("hospital"), echo_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        await client.call("hospital/echo.say", {"n": 0}, timeout=10)  # warm: channels, caches
        loop.create_future = counted_future  # type: ignore[method-assign]
        loop.call_soon_threadsafe = counted_handoff  # type: ignore[method-assign]
        loop.set_task_factory(counted_task)
        try:
            for n in range(EXCHANGES):
                await client.call("hospital/echo.say", {"n": n}, timeout=10)
        finally:
            loop.create_future = create_future  # type: ignore[method-assign]
            loop.call_soon_threadsafe = call_soon_threadsafe  # type: ignore[method-assign]
            loop.set_task_factory(None)
    per = {where: count / EXCHANGES for where, count in futures.items()}
    assert sum(tasks.values()) / EXCHANGES <= 2, tasks  # one Execution per gateway
    assert handoffs / EXCHANGES <= 4, handoffs  # one per store step: 2 steps on each gateway
    store_futures = sum(n for where, n in per.items() if where.startswith("audit/store.py"))
    assert store_futures <= 4, per  # one waiter per step: no helper task or queue in between
    # The agent's stream at the responder: its outbox (the assignment) and two reads (the
    # agent's progress note and its result), and the dispatch waiting for those two.
    assert per.get("edges/participant.py:Connect", 0) <= 1, per
    assert per.get("edges/participant.py:_read_updates", 0) <= 2, per
    assert per.get("exchange/agents.py:_turn", 0) <= 2, per
    # Each gateway: its task's outcome and the one call that follows it.
    assert per.get("exchange/execution.py:<lambda>", 0) <= 2, per
    assert per.get("exchange/execution.py:follow", 0) <= 2, per
    assert sum(per.values()) <= 13, per
