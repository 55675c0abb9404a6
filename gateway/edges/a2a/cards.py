"""Which agents our organization may reach, and their A2A agent cards (docs/a2a.md §5).

Reachable: our local agents (SDK instances and A2A backends), and each partner's agents as its
`ListAgents` shows them to us, nothing more. A partner's list is cached for `refresh_seconds`
and asked again only when stale, so probing card URLs cannot make us flood a partner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.types.a2a_pb2 import (
    AgentCard as A2ACard,
)

from gateway.edges.a2a.port import ExchangePort
from gateway.errors import FedgateError
from gateway.exchange.tasks import AgentCard, SkillCard

log = logging.getLogger("fedgate.a2a")

PROTOCOL_VERSION = "1.0"
SECURITY_SCHEME = "fedgate-participant-token"
INPUT_MODES = ["text/plain", "application/json", "application/octet-stream"]
OUTPUT_MODES = ["text/plain", "application/json", "application/octet-stream"]


@dataclass(frozen=True)
class Target:
    """An agent our organization may reach: `org/agent`."""

    org: str
    agent: str

    @property
    def key(self) -> str:
        return f"{self.org}/{self.agent}"

    @classmethod
    def parse(cls, text: str) -> Target | None:
        org, slash, agent = text.partition("/")
        return cls(org, agent) if slash and org and agent and "/" not in agent else None


@dataclass
class _PeerCards:
    fetched: float = 0.0
    cards: dict[str, AgentCard] | None = None
    lock: asyncio.Lock | None = None


class CardDirectory:
    """The agents our organization may reach, local and partners'."""

    def __init__(
        self,
        port: ExchangePort,
        *,
        refresh_seconds: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.refresh_seconds = refresh_seconds
        self.timeout = timeout
        self._clock = clock
        self._peers: dict[str, _PeerCards] = {}

    async def find(self, target: Target) -> AgentCard | None:
        """The card of one reachable agent, or None."""
        if target.org == self.port.org:
            return self.port.local_card(target.agent)
        if target.org not in self.port.peers:
            return None
        cards = await self._partner(target.org)
        return cards.get(target.agent)

    async def reachable(self) -> list[AgentCard]:
        """Every reachable agent: local ones first, then each partner's, sorted by name."""
        peers = self.port.peers
        lists = await asyncio.gather(*(self._partner(p) for p in peers))
        found = list(self.port.local_cards())
        for cards in lists:
            found.extend(cards[name] for name in sorted(cards))
        return found

    async def _partner(self, peer: str) -> dict[str, AgentCard]:
        entry = self._peers.setdefault(peer, _PeerCards())
        if entry.cards is not None and self._clock() - entry.fetched < self.refresh_seconds:
            return entry.cards
        if entry.lock is None:
            entry.lock = asyncio.Lock()
        async with entry.lock:
            if entry.cards is not None and self._clock() - entry.fetched < self.refresh_seconds:
                return entry.cards
            try:
                cards = await self.port.partner_cards(peer, within=self.timeout)
            except FedgateError as exc:
                # Keep what the partner last showed us: a call then fails with the reason.
                log.info("agent list of %s not refreshed: %s", peer, exc.message)
                entry.fetched = self._clock()
                entry.cards = entry.cards if entry.cards is not None else {}
                return entry.cards
            entry.cards = {card.name: card for card in cards}
            entry.fetched = self._clock()
            return entry.cards


def a2a_card(
    card: AgentCard,
    skills: Iterable[SkillCard],
    *,
    our_org: str,
    base_url: str,
    grpc_address: str | None,
    require_tokens: bool,
) -> A2ACard:
    """The A2A card our gateway serves for a reachable agent: every interface is ours."""
    target = Target(card.org, card.name)
    path = f"{base_url}/a2a/{target.key}"
    interfaces = [
        AgentInterface(
            url=f"{path}/jsonrpc", protocol_binding="JSONRPC", protocol_version=PROTOCOL_VERSION
        ),
        AgentInterface(
            url=f"{path}/rest", protocol_binding="HTTP+JSON", protocol_version=PROTOCOL_VERSION
        ),
    ]
    if grpc_address:
        interfaces.append(
            AgentInterface(
                url=grpc_address,
                protocol_binding="GRPC",
                protocol_version=PROTOCOL_VERSION,
                tenant=target.key,
            )
        )
    where = "our" if card.org == our_org else f"{card.org!r}'s"
    a2a = A2ACard(
        name=target.key,
        description=card.description
        or f"{where} agent {card.name!r}, through the gateway of {our_org!r}",
        version=card.version or "0",
        provider=AgentProvider(organization=card.org, url=base_url),
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(
            streaming=True, push_notifications=False, extended_agent_card=False
        ),
        default_input_modes=INPUT_MODES,
        default_output_modes=OUTPUT_MODES,
        skills=[
            AgentSkill(
                id=skill.name,
                name=skill.name,
                description=skill.description or f"skill {skill.name} of {target.key}",
                tags=[card.org, card.name],
            )
            for skill in skills
        ],
    )
    if require_tokens:
        a2a.security_schemes[SECURITY_SCHEME].CopyFrom(
            SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="bearer",
                    bearer_format="JWT",
                    description=(
                        f"a participant token of {our_org!r}'s gateway "
                        "(`fedgate tokens issue --call ORG/AGENT.SKILL`)"
                    ),
                )
            )
        )
        requirement = SecurityRequirement()
        requirement.schemes[SECURITY_SCHEME].CopyFrom(StringList())
        a2a.security_requirements.append(requirement)
    return a2a
