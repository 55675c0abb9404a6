"""Partner organizations: the configured peers, outbound channels, and a circuit breaker each.

A channel to peer `org` verifies the server certificate as `org.fedgate` against the federation
CA, so only that organization's gateway can answer. Channels are rebuilt when our own TLS
material is rotated.

Circuit breaker: after `failure_threshold` consecutive transport failures a peer's circuit opens
and calls fail at once with UNAVAILABLE instead of waiting out their deadlines. While it is open,
the peer's health is probed in the background every `probe_seconds` with the standard gRPC health
service (grpc.health.v1, service "fedgate.v1.Federation", which every gateway serves on its
federation listener) over a fresh mTLS channel that verifies the peer's certificate as any call
does: the first probe answered SERVING closes the circuit, so calls flow again as soon as the
partner is back. A peer that does not serve the health service (UNIMPLEMENTED) is not probed
again until its circuit next opens. Whatever the probes say, after `reset_seconds` one call is let
through (half-open): its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from fedgate.v1 import fedgate_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import PeerSection
from gateway.errors import NotFound, Unavailable
from gateway.identity.certs import org_dns_name
from gateway.identity.tls import ReloadingTls

log = logging.getLogger("fedgate.peers")


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
# The service a probe asks about: a gateway reports it NOT_SERVING while it shuts down.
HEALTH_SERVICE = "fedgate.v1.Federation"


@dataclass
class PeerHealth:
    """What this gateway knows of a peer's health, for the breaker and `fedgate peers`."""

    circuit: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    latency_ms: float = 0.0
    last_error: str = ""
    in_flight: int = 0
    probing: bool = False  # a half-open call is under way
    health_probes: int = 0  # background health probes sent since the circuit last opened
    last_probe: str = ""  # what the last failed probe got


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    stub: pb_grpc.FederationStub
    stamp: tuple[float, ...]


class PeerRegistry:
    """Configured peers and lazily opened, reusable federation channels to them."""

    def __init__(
        self,
        org: str,
        peers: Mapping[str, PeerSection],
        tls: ReloadingTls,
        *,
        max_message_bytes: int,
        failure_threshold: int = 5,
        reset_seconds: float = 10.0,
        probe_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.org = org
        self._peers = dict(peers)
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.probe_seconds = probe_seconds
        self._clock = clock
        self.health: dict[str, PeerHealth] = {name: PeerHealth() for name in self._peers}
        self._tls = tls
        self._max_message_bytes = max_message_bytes
        self._channels: dict[str, _Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._probes: dict[str, asyncio.Task[None]] = {}

    def __contains__(self, org: str) -> bool:
        return org in self._peers

    @property
    def names(self) -> list[str]:
        return sorted(self._peers)

    def address(self, org: str) -> str:
        return self._require(org).address

    def set_address(self, org: str, address: str) -> None:
        """Point a configured peer at a new address (used when peers bind port 0 in one process)."""
        self._peers[org] = PeerSection(address=address)
        self.health.setdefault(org, PeerHealth())
        self._channels.pop(org, None)

    def redial(self, org: str) -> None:
        """Dial afresh next time instead of waiting out a broken channel's reconnect backoff:
        a partner that restarted is reachable again at once (its circuit limits the retries)."""
        broken = self._channels.pop(org, None)
        if broken is not None:
            self._retired.append(broken.channel)

    def admit(self, org: str) -> float:
        """Let a call to `org` through the breaker (returns its start time) or fail fast."""
        self._require(org)
        health = self.health[org]
        now = self._clock()
        if health.circuit == OPEN:
            wait = health.opened_at + self.reset_seconds - now
            if wait > 0:
                raise Unavailable(
                    f"circuit to organization {org!r} is open after {health.consecutive_failures} "
                    f"failures (last: {health.last_error}); next probe in {wait:.1f}s"
                )
            health.circuit = HALF_OPEN
        if health.circuit == HALF_OPEN:
            if health.probing:
                raise Unavailable(
                    f"circuit to organization {org!r} is half-open and a probe call is under way"
                )
            health.probing = True
        health.in_flight += 1
        return now

    def record(self, org: str, started: float, *, failure: str | None) -> None:
        """The outcome of an admitted call: a transport failure, or None for an answer."""
        health = self.health[org]
        health.in_flight = max(0, health.in_flight - 1)
        health.probing = False
        if failure is None:
            elapsed = (self._clock() - started) * 1000
            health.latency_ms = (
                elapsed if not health.latency_ms else 0.8 * health.latency_ms + 0.2 * elapsed
            )
            if health.circuit != CLOSED:
                log.info("circuit to %s closed", org)
            health.circuit, health.consecutive_failures = CLOSED, 0
            return
        health.consecutive_failures += 1
        health.last_error = failure
        self.redial(org)
        if health.circuit == HALF_OPEN or health.consecutive_failures >= self.failure_threshold:
            if health.circuit != OPEN:
                log.warning(
                    "circuit to %s opened after %d failures", org, health.consecutive_failures
                )
                health.health_probes = 0
            health.circuit = OPEN
            health.opened_at = self._clock()
            self._start_probing(org)

    def _start_probing(self, org: str) -> None:
        """Probe `org` in the background until its circuit closes (one prober per peer)."""
        running = self._probes.get(org)
        if running is not None and not running.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a caller outside an event loop (a unit test): the timed half-open remains
        self._probes[org] = loop.create_task(self._probe_until_closed(org))

    def probing_health(self, org: str) -> bool:
        """Whether `org`'s health is being probed in the background (its circuit is open)."""
        probe = self._probes.get(org)
        return probe is not None and not probe.done()

    async def _probe_until_closed(self, org: str) -> None:
        health = self.health[org]
        while health.circuit != CLOSED:
            await asyncio.sleep(self.probe_seconds)
            if health.circuit == CLOSED:
                return  # a half-open call closed it meanwhile
            health.health_probes += 1
            problem = await self.probe(org)
            if problem is None:
                if health.circuit != CLOSED:
                    log.info("circuit to %s closed: its health probe answered SERVING", org)
                    health.circuit, health.consecutive_failures = CLOSED, 0
                    # Calls dial afresh instead of waiting out the old channel's reconnect backoff.
                    self.redial(org)
                return
            health.last_probe = problem
            if problem.startswith(grpc.StatusCode.UNIMPLEMENTED.name):
                log.info(
                    "peer %s does not serve the gRPC health service; its circuit closes only "
                    "through a half-open call after %.0fs",
                    org,
                    self.reset_seconds,
                )
                return

    async def probe(self, org: str) -> str | None:
        """One health check of `org`'s gateway over a fresh mTLS channel: None when it answers
        SERVING, else what it answered (a status, or the transport error)."""
        try:
            channel = self._dial(org)
        except Exception as exc:  # our own TLS material unreadable mid-rotation: try again later
            return f"cannot dial: {type(exc).__name__}"
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=HEALTH_SERVICE),
                timeout=max(0.5, min(2.0, self.reset_seconds)),
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details()
            return f"{exc.code().name}: {details}" if details else exc.code().name
        finally:
            await channel.close()
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        return None

    def _require(self, org: str) -> PeerSection:
        peer = self._peers.get(org)
        if peer is None:
            raise NotFound(
                f"organization {org!r} is not a peer of {self.org!r}: add it under "
                f"[peers.{org}] in fedgate.toml"
            )
        return peer

    def stub(self, org: str) -> pb_grpc.FederationStub:
        """The federation stub for `org`, on a channel made with our current TLS material."""
        self._require(org)
        material = self._tls.material
        current = self._channels.get(org)
        if current is not None and current.stamp == material.stamp:
            return current.stub
        if current is not None:
            # Keep the old channel open for the calls still using it; closed at shutdown.
            self._retired.append(current.channel)
        channel = self._dial(org)
        entry = _Channel(channel, pb_grpc.FederationStub(channel), material.stamp)
        self._channels[org] = entry
        return entry.stub

    def _dial(self, org: str) -> grpc.aio.Channel:
        """A new mTLS channel to `org`'s gateway, verifying its certificate as `org.fedgate`."""
        peer = self._require(org)
        options = [
            ("grpc.ssl_target_name_override", org_dns_name(org)),
            ("grpc.max_send_message_length", self._max_message_bytes),
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
            # A peer that comes back (or a handshake that now succeeds after a rotation) is
            # retried within a fraction of a second, not after grpc's default backoff of 1-120 s.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        return grpc.aio.secure_channel(peer.address, self._tls.channel_credentials(), options)

    async def close(self) -> None:
        probes = list(self._probes.values())
        self._probes.clear()
        for probe in probes:
            probe.cancel()
            with contextlib.suppress(BaseException):
                await probe
        channels = [c.channel for c in self._channels.values()] + self._retired
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            await channel.close()
