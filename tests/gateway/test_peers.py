"""The circuit breaker's health probes, against a real mTLS server that goes away and comes back.

The breaker's clock is frozen, so its timed half-open never comes: a circuit that closes here was
closed by a background health probe (grpc.health.v1 over the peer's mTLS channel).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.config import PeerSection
from gateway.errors import Unavailable
from gateway.identity.tls import ReloadingTls, TlsFiles
from gateway.peers import CLOSED, HEALTH_SERVICE, OPEN, PeerRegistry
from tests.conftest import Pki
from tests.integration.federation import eventually
from tests.processes import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tls(pki: Pki, org: str) -> ReloadingTls:
    return ReloadingTls(TlsFiles(pki.cert(org), pki.key(org), pki.ca))


@contextlib.asynccontextmanager
async def partner(
    pki: Pki, port: int, *, cert: str = "lab", status: int | None = SERVING
) -> AsyncIterator[health.aio.HealthServicer]:
    """A gateway's federation listener as far as a probe sees it: mTLS, and the health service
    (none at all when status is None)."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    if status is not None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        await servicer.set(HEALTH_SERVICE, status)
    assert server.add_secure_port(f"127.0.0.1:{port}", tls(pki, cert).server_credentials()) == port
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(0)


@pytest.fixture
async def breaker(pki: Pki) -> AsyncIterator[PeerRegistry]:
    """hospital's registry with peer `lab` on a free port, its circuit open, its clock frozen."""
    registry = PeerRegistry(
        "hospital",
        {"lab": PeerSection(address=f"127.0.0.1:{free_port()}")},
        tls(pki, "hospital"),
        max_message_bytes=1 << 20,
        failure_threshold=1,
        reset_seconds=10,
        probe_seconds=0.05,
        clock=lambda: 100.0,
    )
    registry.record("lab", registry.admit("lab"), failure="lab is down")
    assert registry.health["lab"].circuit == OPEN
    try:
        yield registry
    finally:
        await registry.close()


def port_of(registry: PeerRegistry) -> int:
    return int(registry.address("lab").rpartition(":")[2])


async def probed(registry: PeerRegistry, times: int) -> None:
    """Wait until `times` more probes were sent and answered."""
    health = registry.health["lab"]
    target = health.health_probes + times + 1  # + 1: the one under way has no answer yet
    assert await eventually(lambda: health.health_probes >= target, 10), health


async def test_an_open_circuit_closes_as_soon_as_the_partner_answers_its_probe(
    breaker: PeerRegistry, pki: Pki
) -> None:
    health = breaker.health["lab"]
    await probed(breaker, 2)
    assert health.circuit == OPEN and health.last_probe.startswith("UNAVAILABLE"), health
    with pytest.raises(Unavailable, match="circuit to organization 'lab' is open"):
        breaker.admit("lab")

    async with partner(pki, port_of(breaker)):
        assert await eventually(lambda: health.circuit == CLOSED, 10), health
        assert health.consecutive_failures == 0
        breaker.record("lab", breaker.admit("lab"), failure=None)  # calls go through again

    # Gone again: the next failures open it, and it is probed again until the partner is back.
    breaker.record("lab", breaker.admit("lab"), failure="lab is down again")
    assert health.circuit == OPEN
    await probed(breaker, 1)
    assert health.circuit == OPEN
    async with partner(pki, port_of(breaker)):
        assert await eventually(lambda: health.circuit == CLOSED, 10), health


async def test_a_partner_that_is_not_serving_keeps_its_circuit_open(
    breaker: PeerRegistry, pki: Pki
) -> None:
    """A gateway that is shutting down answers NOT_SERVING: that is no reason to send it calls."""
    health = breaker.health["lab"]
    async with partner(pki, port_of(breaker), status=NOT_SERVING) as servicer:
        await probed(breaker, 2)
        assert health.circuit == OPEN and health.last_probe == "NOT_SERVING", health
        await servicer.set(HEALTH_SERVICE, SERVING)
        assert await eventually(lambda: health.circuit == CLOSED, 10), health


async def test_another_organizations_gateway_at_the_address_does_not_close_the_circuit(
    breaker: PeerRegistry, pki: Pki
) -> None:
    """The probe verifies the certificate as `lab.fedgate`: mallory answering SERVING there is
    not lab being back."""
    health = breaker.health["lab"]
    async with partner(pki, port_of(breaker), cert="mallory"):
        await probed(breaker, 2)
        assert health.circuit == OPEN and health.last_probe.startswith("UNAVAILABLE"), health
    async with partner(pki, port_of(breaker)):
        assert await eventually(lambda: health.circuit == CLOSED, 10), health


async def test_a_partner_without_the_health_service_waits_for_the_timed_half_open(
    pki: Pki,
) -> None:
    now = [100.0]
    registry = PeerRegistry(
        "hospital",
        {"lab": PeerSection(address=f"127.0.0.1:{free_port()}")},
        tls(pki, "hospital"),
        max_message_bytes=1 << 20,
        failure_threshold=1,
        reset_seconds=10,
        probe_seconds=0.05,
        clock=lambda: now[0],
    )
    health = registry.health["lab"]
    try:
        async with partner(pki, port_of(registry), status=None):
            registry.record("lab", registry.admit("lab"), failure="lab is down")
            assert await eventually(lambda: health.last_probe.startswith("UNIMPLEMENTED"), 10)
            assert await eventually(lambda: not registry.probing_health("lab"), 10)
            assert health.circuit == OPEN and health.health_probes == 1
            now[0] += 10
            registry.record("lab", registry.admit("lab"), failure=None)  # the half-open call
            assert health.circuit == CLOSED
    finally:
        await registry.close()
