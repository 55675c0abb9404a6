"""What the A2A edges use of the router, in one place (docs/a2a.md §7).

The edges call only the router's public surface (BRIEF decision 5): submit (with `turn` for a
next message), get, cancel, and the agent registry's cards. One thing they need is not in the
core yet; `ExchangePort.partner_cards` stands in for it so the lead can move it into the core:

    async Router.partner_cards(peer_org: str) -> list[AgentCard]
        the cards a partner's ListAgents shows us, through its circuit breaker, bounded in time;
        NotFound for an organization that is not a peer, PeerUnreachable when it does not answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.exchange.router import Router
from gateway.exchange.tasks import AgentCard, TaskResult, TaskSpec, TaskState, TaskUpdate


class ExchangePort:
    """The router as the A2A edges see it."""

    def __init__(self, router: Router) -> None:
        self.router = router

    @property
    def org(self) -> str:
        return self.router.org

    @property
    def peers(self) -> list[str]:
        return self.router.peers.names

    def submit(self, spec: TaskSpec, *, stream: bool = True) -> AsyncIterator[TaskUpdate]:
        return self.router.submit(spec, stream=stream)

    async def get(self, task_id: str, *, owner: str | None) -> TaskResult:
        return await self.router.get(task_id, origin_org=self.router.org, owner=owner)

    async def cancel(self, task_id: str, reason: str, *, owner: str | None) -> TaskState:
        return await self.router.cancel(task_id, reason, origin_org=self.router.org, owner=owner)

    def local_cards(self) -> list[AgentCard]:
        return self.router.agents.cards()

    def local_card(self, agent: str) -> AgentCard | None:
        return self.router.agents.card(agent)

    async def partner_cards(self, peer: str, *, within: float = 5.0) -> list[AgentCard]:
        return await self.router.partner_cards(peer, within=within)

    def continue_task(self, spec: TaskSpec) -> AsyncIterator[TaskUpdate]:
        """The next turn of a task waiting for input (`spec.turn` > 0): the router's submit."""
        return self.router.submit(spec, stream=True)
