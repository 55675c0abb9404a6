"""What the A2A edges use of the router, in one place (docs/a2a.md §7).

The edges call only the router's public surface (BRIEF decision 5). Two things they need are not
in the core yet; `ExchangePort` stands in for them so the lead can move them into the core:

    async Router.partner_cards(peer_org: str) -> list[AgentCard]
        the cards a partner's ListAgents shows us, through its circuit breaker, bounded in time;
        NotFound for an organization that is not a peer, PeerUnreachable when it does not answer.

    Router.submit(spec, stream=True) with spec.turn > 0   (BRIEF decision 4)
        continues task `spec.task_id` of the same owner with the next message as its input;
        its updates end at the next turn-ending state (input-required, or a final one).
        NotFound for a task this owner does not have; InvalidArgument for one not waiting for input.

Until the core has turns, `supports_turns` is False and `continue_task` refuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from fedgate.v1 import fedgate_pb2 as pb

from gateway.edges.a2a.errors import TurnsUnsupported
from gateway.edges.wire import AgentCard, card_from_pb
from gateway.errors import FedgateError, PeerUnreachable
from gateway.exchange.router import Router
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskState, TaskUpdate


class ExchangePort:
    """The router as the A2A edges see it."""

    supports_turns = False

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
        """Adapter for Router.partner_cards (not in the core yet)."""
        stub = self.router.peers.stub(peer)  # NotFound for an organization that is not a peer
        try:
            reply = await stub.ListAgents(pb.ListAgentsRequest(), timeout=within)
        except grpc.aio.AioRpcError as exc:
            raise PeerUnreachable(
                f"organization {peer!r} did not list its agents: {exc.code().name}: {exc.details()}"
            ) from None
        cards = []
        for message in reply.agents:
            try:
                cards.append(card_from_pb(message, org=peer))
            except (ValueError, FedgateError):
                continue  # a card we cannot read is a card we do not offer
        return cards

    def continue_task(self, spec: TaskSpec) -> AsyncIterator[TaskUpdate]:
        """Adapter for Router.submit with a turn (not in the core yet): refuses."""
        raise TurnsUnsupported(
            f"task {spec.task_id!r} waits for input, but this gateway cannot continue a task "
            "with a follow-up message yet (multi-turn support comes with the core's turns): "
            "cancel it and send a new message"
        )
