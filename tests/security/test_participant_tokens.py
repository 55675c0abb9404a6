"""The participant listener: tokens decide which agents a process may register and what it may call."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from fedgate.v1 import fedgate_pb2 as pb
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

from gateway.identity.tokens import TOKEN_TYPE, token_authority
from gateway.local import LocalFederation
from participant_sdk import AgentWorker, Client, PermissionDenied, Unauthenticated
from tests.integration.federation import echo_agent, records_agent
from tests.security.conftest import hospital_tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict) -> str:
    return _b64(json.dumps(value).encode())


def _payload(fed: LocalFederation, **changes: object) -> dict:
    now = int(time.time())
    claims = {
        "iss": "fedgate:hospital",
        "aud": "fedgate:hospital:participant",
        "sub": "mallory",
        "jti": "f" * 32,
        "iat": now,
        "exp": now + 3600,
        "agents": ["*"],
        "calls": ["*/*.*"],
    }
    claims.update(changes)
    return claims


async def _register(
    fed: LocalFederation, token: str | None, agent: str = "records"
) -> grpc.StatusCode:
    """Try to register an agent with a raw Connect stream; returns how the gateway answered."""
    async with grpc.aio.insecure_channel(fed.participant("hospital")) as channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        call = pb_grpc.ParticipantStub(channel).Connect(metadata=metadata, timeout=5)
        card = pb.AgentCard(name=agent, skills=[pb.Skill(name="summary")])
        await call.write(pb.AgentMessage(register=pb.RegisterAgents(cards=[card])))
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            _register.details = exc.details() or ""  # type: ignore[attr-defined]
            return exc.code()
        assert first.registered.agents == [agent]
        await call.done_writing()
        call.cancel()
        return grpc.StatusCode.OK


async def test_agent_with_a_token_that_names_it_registers(secure_fed: LocalFederation) -> None:
    token = hospital_tokens(secure_fed).issue("records-service", agents=["records"])
    worker = AgentWorker([records_agent()], secure_fed.participant("hospital"), token=token)
    task = asyncio.ensure_future(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        assert secure_fed["hospital"].agents.instance_count("records") == 1
    finally:
        worker.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_registering_an_agent_the_token_does_not_name_is_denied(
    secure_fed: LocalFederation,
) -> None:
    token = hospital_tokens(secure_fed).issue("echo-service", agents=["echo"])
    assert await _register(secure_fed, token, "records") == grpc.StatusCode.PERMISSION_DENIED
    assert "may not register agent 'records'" in _register.details  # type: ignore[attr-defined]
    worker = AgentWorker([records_agent()], secure_fed.participant("hospital"), token=token)
    with pytest.raises(PermissionDenied, match="may not register agent 'records'"):
        await asyncio.wait_for(worker.run(), 10)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "garbage",
        "alg-none",
        "hs256-public-key",
        "expired",
        "wrong-audience",
        "other-gateway",
    ],
)
async def test_bad_tokens_are_unauthenticated(secure_fed: LocalFederation, kind: str) -> None:
    authority = hospital_tokens(secure_fed)
    public_pem = (
        serialization.load_pem_private_key(authority.key_path.read_bytes(), password=None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if kind == "missing":
        token, expected = None, "no participant token"
    elif kind == "garbage":
        token, expected = "not-a-jwt", "malformed participant token"
    elif kind == "alg-none":
        token = f"{_segment({'alg': 'none', 'typ': TOKEN_TYPE})}.{_segment(_payload(secure_fed))}."
        expected = "uses algorithm 'none'"
    elif kind == "hs256-public-key":
        signing_input = (
            f"{_segment({'alg': 'HS256', 'typ': TOKEN_TYPE})}.{_segment(_payload(secure_fed))}"
        )
        mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        token, expected = f"{signing_input}.{_b64(mac)}", "uses algorithm 'HS256'"
    elif kind == "expired":
        authority._clock = lambda: time.time() - 2 * 86400  # type: ignore[method-assign]
        token = authority.issue("svc", agents=["records"], ttl_seconds=60)
        expected = "expired"
    elif kind == "wrong-audience":
        token = _sign(authority, _payload(secure_fed, aud="fedgate:hospital:admin"))
        expected = "audience"
    else:
        other = token_authority(secure_fed["insurer"].config)
        token, expected = other.issue("svc", agents=["records"]), "signature does not verify"
    assert await _register(secure_fed, token) == grpc.StatusCode.UNAUTHENTICATED
    assert expected in _register.details  # type: ignore[attr-defined]
    async with Client(secure_fed.participant("hospital"), token=token) as client:
        with pytest.raises(Unauthenticated, match=expected.split("'")[0]):
            await client.call("insurer/claims.check", {}, timeout=5)


def _sign(authority, payload: dict) -> str:  # type: ignore[no-untyped-def]
    import jwt

    key = serialization.load_pem_private_key(authority.key_path.read_bytes(), password=None)
    return jwt.encode(
        payload, key, algorithm="ES256", headers={"typ": TOKEN_TYPE, "kid": authority.key_id}
    )


async def test_call_outside_the_token_is_denied(secure_fed: LocalFederation) -> None:
    token = hospital_tokens(secure_fed).issue("billing", calls=["insurer/claims.check"])
    async with Client(secure_fed.participant("hospital"), token=token) as client:
        with pytest.raises(PermissionDenied, match="may not call 'insurer/echo.say'"):
            await client.call("insurer/echo.say", {}, timeout=5)


async def test_revoked_token_stops_working_at_once_even_on_an_open_stream(
    secure_fed: LocalFederation,
) -> None:
    authority = hospital_tokens(secure_fed)
    token = authority.issue("echo-service", agents=["echo"], calls=["hospital/echo.say"])
    worker = AgentWorker(
        [echo_agent()], secure_fed.participant("hospital"), token=token, max_backoff=0.2
    )
    task = asyncio.ensure_future(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        async with Client(secure_fed.participant("hospital"), token=token) as client:
            assert (await client.call("hospital/echo.say", {}, timeout=5)).ok
            token_id = authority.list()[-1].token_id
            token_authority(secure_fed["hospital"].config).revoke(
                token_id
            )  # as `fedgate tokens revoke` would
            with pytest.raises(Unauthenticated, match="revoked"):
                await client.call("hospital/echo.say", {}, timeout=5)
        with pytest.raises(Unauthenticated, match="revoked"):
            await asyncio.wait_for(task, 10)
        assert secure_fed["hospital"].agents.instance_count("echo") == 0
    finally:
        worker.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_requester_identity_comes_from_the_token(secure_fed: LocalFederation) -> None:
    token = hospital_tokens(secure_fed).issue("billing-office", calls=["insurer/echo.say"])
    from tests.integration.federation import serving

    async with (
        serving(secure_fed.participant("insurer"), echo_agent()),
        Client(secure_fed.participant("hospital"), token=token, requester="clerk-3") as client,
    ):
        await client.call("insurer/echo.say", {}, timeout=5, task_id="who-1")
    (sent,) = secure_fed["hospital"].audit.query(task_id="who-1", kind="request_sent")
    (received,) = secure_fed["insurer"].audit.query(task_id="who-1", kind="request_received")
    assert sent.requester == "billing-office/clerk-3"
    assert received.requester == "billing-office/clerk-3", "the delegation statement carries it"
