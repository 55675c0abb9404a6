"""Issue 11 (low): a local process on the participant listener, without the right token, learns
nothing about the gateway; a Connect stream that never registers is closed."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest
from fedgate.v1 import fedgate_pb2 as pb

from gateway.identity.tokens import token_authority
from gateway.local import LocalFederation
from tests.conftest import Pki
from tests.integration.federation import echo_agent, org_config, serving
from tests.security.conftest import hospital_tokens
from tests.security.raw import bearer, participant_client, refusal


async def test_the_operator_views_need_an_operator_token(secure_fed: LocalFederation) -> None:
    authority = hospital_tokens(secure_fed)
    agent = authority.issue("echo", agents=["echo"])
    caller = authority.issue("clerk", calls=["*"])
    async with (
        serving(secure_fed.participant("hospital"), echo_agent(), token=agent),
        participant_client(secure_fed, "hospital") as hospital,
    ):
        views = {
            "agents": lambda m: hospital.ListConnectedAgents(
                pb.ListAgentsRequest(), timeout=5, metadata=m
            ),
            "peers": lambda m: hospital.ListPeers(pb.ListPeersRequest(), timeout=5, metadata=m),
        }
        for name, view in views.items():
            anonymous = await refusal(view(()))
            assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "no participant token" in (anonymous.details() or "")
            for token in (caller, agent):  # "*" to call, an agent's token: neither is operator
                refused = await refusal(view(bearer(token)))
                assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, name
                assert "takes an operator token" in (refused.details() or "")
                assert "fedgate tokens issue --subject NAME --operator" in (refused.details() or "")
        operator = authority.issue("ops", operator=True)
        agents = await views["agents"](bearer(operator))
        peers = await views["peers"](bearer(operator))
    assert [a.card.name for a in agents.agents] == ["echo"]
    assert sorted(p.org for p in peers.peers) == ["insurer", "lab"]


async def test_a_silent_connect_is_closed_with_a_clear_status(tmp_path: Path, pki: Pki) -> None:
    config = org_config(tmp_path, pki, "hospital", "", [], require_tokens=True)
    text = config.read_text().replace(
        "require_tokens = true", "require_tokens = true\nconnect_timeout_seconds = 0.5"
    )
    config.write_text(text)
    async with LocalFederation([config]) as fed, participant_client(fed, "hospital") as hospital:
        call = hospital.Connect(timeout=60)  # opened, and then nothing is ever written
        error = await refusal(call.read())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no RegisterAgents message within 0.5 s of opening Connect" in (error.details() or "")
    assert "participant.connect_timeout_seconds" in (error.details() or "")


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_fedgate_agents_and_peers_pass_the_operator_token(
    secure_fed: LocalFederation,
) -> None:
    """`fedgate agents` / `fedgate peers` against a gateway that requires tokens."""
    fed = secure_fed
    address = fed.participant("hospital")
    operator = token_authority(fed["hospital"].config).issue("ops", operator=True)
    code, _, err = await _cli("peers", "--address", address, env={"FEDGATE_TOKEN": ""})
    assert code == 2
    assert "refused: no participant token" in err and "--token or FEDGATE_TOKEN" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = await _cli("peers", "--address", address, "--json", "--token", operator)
    assert code == 0, err
    assert '"org": "insurer"' in out
    code, out, err = await _cli(
        "agents", "--address", address, "--json", env={"FEDGATE_TOKEN": operator}
    )
    assert code == 0, err
    assert out.strip() == "[]"
