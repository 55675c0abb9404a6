"""Two gateways with A2A edges and the scenario agent behind one of them, in one event loop.

    hospital gateway ── A2A out ──► scenario agent (a2a-sdk only), as hospital/scenario
        ▲ A2A in: /a2a/hospital/scenario   (target a: a local agent through the edge)
        ║ mTLS federation
    insurer gateway
        ▲ A2A in: /a2a/hospital/scenario   (target b: a partner's agent across the hop)

Run alone, it prints both targets' URLs and serves until interrupted (for the TCK):

    python -m tests.a2a.federation [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from a2a.server.agent_execution import AgentExecutor
from a2a.types.a2a_pb2 import AgentCard

from gateway.local import LocalFederation, write_gateway_config
from tests.a2a.scenario_agent import Served, scenario_card, serve_scenario_agent

MODEL = Path(__file__).resolve().parents[2] / "policies" / "model.conf"

# The hospital shares what the scenarios return with the insurer, and nothing else.
HOSPITAL_RULES = """\
p, insurer, scenario, *, invoke, *, allow
p, insurer, scenario, *, share, artifacts, allow
p, insurer, scenario, *, share, status, allow
p, insurer, scenario, *, share, message, allow
"""
# The insurer sends the scenario agent its messages' parts, ids (the scenarios are keyed by
# message-id prefixes) and conversations.
INSURER_RULES = """\
p, hospital, scenario, *, send, parts, allow
p, hospital, scenario, *, send, message_id, allow
p, hospital, scenario, *, send, context, allow
"""


def a2a_section(
    *, default_agent: str | None, agents: dict[str, str] | None = None, extra: str = ""
) -> str:
    lines = ["[a2a]", 'listen = "127.0.0.1:0"', 'grpc_listen = "127.0.0.1:0"']
    if default_agent:
        lines.append(f'grpc_default_agent = "{default_agent}"')
    lines.append(extra)
    for name, url in (agents or {}).items():
        lines += ["", "[[a2a.agents]]", f'name = "{name}"', f'card_url = "{url}"']
    return "\n".join(lines) + "\n"


def federation_configs(
    root: Path,
    pki_root: Path,
    agent_card_url: str,
    *,
    hospital_rules: str = HOSPITAL_RULES,
    insurer_rules: str = INSURER_RULES,
    require_tokens: bool = False,
    a2a_extra: str = "",
) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    configs = []
    for org, rules, peer, agents in (
        ("hospital", hospital_rules, "insurer", {"scenario": agent_card_url}),
        ("insurer", insurer_rules, "hospital", None),
    ):
        rules_path = root / f"{org}.csv"
        rules_path.write_text(rules)
        configs.append(
            write_gateway_config(
                root / org,
                org,
                cert=pki_root / f"{org}.crt",
                key=pki_root / f"{org}.key",
                ca=pki_root / "ca.crt",
                model=MODEL,
                rules=rules_path,
                peers=[peer],
                require_tokens=require_tokens,
                extra=a2a_section(
                    default_agent="hospital/scenario", agents=agents, extra=a2a_extra
                ),
            )
        )
    return configs


@dataclass(frozen=True)
class A2AFederation:
    federation: LocalFederation
    agent: Served

    def a2a_base(self, org: str) -> str:
        edge = self.federation[org].a2a
        assert edge is not None
        return edge.base_url()

    def card_host(self, org: str, target: str = "hospital/scenario") -> str:
        """What the TCK's --sut-host takes: the folder of the target's card at `org`."""
        return f"{self.a2a_base(org)}/a2a/{target}"

    def grpc(self, org: str) -> str:
        edge = self.federation[org].a2a
        assert edge is not None and edge.grpc_address() is not None
        return str(edge.grpc_address())


@contextlib.asynccontextmanager
async def a2a_federation(
    root: Path,
    pki_root: Path,
    *,
    executor: AgentExecutor | None = None,
    card: Callable[[str, int, int | None], AgentCard] = scenario_card,
    **options: Any,
) -> AsyncIterator[A2AFederation]:
    """The scenario agent (or `executor` behind `card`) and both gateways, for the block."""
    async with serve_scenario_agent(executor=executor, card=card) as agent:
        configs = federation_configs(root, pki_root, agent.card_url, **options)
        federation = LocalFederation(configs)
        await federation.start()
        try:
            yield A2AFederation(federation, agent)
        finally:
            await federation.stop()


async def _main(ready_file: Path | None) -> None:
    from tests.conftest import build_pki

    with tempfile.TemporaryDirectory(prefix="fedgate-a2a-") as folder:
        root = Path(folder)
        (root / "pki").mkdir()
        pki = build_pki(root / "pki")
        async with a2a_federation(root / "orgs", pki.root) as fed:
            targets = {
                "local": fed.card_host("hospital"),
                "federated": fed.card_host("insurer"),
            }
            print(json.dumps(targets), flush=True)
            if ready_file is not None:
                ready_file.write_text(json.dumps(targets))  # noqa: ASYNC240 (once, tiny)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ready-file", type=Path)
    asyncio.run(_main(parser.parse_args().ready_file))
