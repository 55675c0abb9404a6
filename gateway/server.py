"""Bootstrap: build one organization's gateway from its config, start it, stop it gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.audit.store import AuditStore, open_store
from gateway.config import GatewayConfig
from gateway.data_folder import (
    DataFolderLock,
    create_private_file,
    ensure_private_folder,
    sqlite_file,
)
from gateway.edges.servicers import FederationServicer, ParticipantServicer, add_servicer
from gateway.edges.wire import checkpoint_from_pb, checkpoint_to_pb
from gateway.errors import ConfigError, FedgateError, PermissionDenied
from gateway.exchange.agents import AgentRegistry
from gateway.exchange.limits import PeerLimiter
from gateway.exchange.refusals import RefusalLog
from gateway.exchange.router import Limits, Router
from gateway.grpc_log import HandshakeLog
from gateway.identity.delegation import DelegationVerifier
from gateway.identity.signing import Signer, Verifier
from gateway.identity.tls import ReloadingTls, TlsFiles, TlsMaterial
from gateway.identity.tokens import token_authority
from gateway.payload import load_or_create_digest_key
from gateway.peers import PeerRegistry
from gateway.policy.engine import PolicyHolder, load_or_create_pseudonym_key, load_policy
from gateway.policy.keys import load_pseudonym_keys

if TYPE_CHECKING:
    from gateway.edges.a2a import A2AEdge

log = logging.getLogger("fedgate.server")


@dataclass(frozen=True)
class BoundPorts:
    federation: int
    participant: int


def _server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    size = config.limits.max_message_bytes
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


def build_policy(config: GatewayConfig) -> PolicyHolder | None:
    """The policy holder for a config, or None (nothing is shared) when it names no policy."""
    section = config.policy
    if section is None:
        return None
    key_path = config.pseudonym_key_path
    load_or_create_pseudonym_key(key_path)  # created at start only, never by a reload
    # The key is read at every (re)load, so a rotated pseudonym key takes effect on reload; a
    # key file gone missing is refused then (the old policy keeps serving), not silently replaced.
    return PolicyHolder(
        lambda: load_policy(
            section.model, section.rules, pseudonym_key=load_pseudonym_keys(key_path).current.key
        )
    )


class Gateway:
    """One organization's gateway: a federation listener (mTLS) and a participant listener."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        audit: AuditStore | None = None,
    ) -> None:
        self.config = config
        # Before anything writes to it: the folder is ours alone, and so are its databases.
        ensure_private_folder(config.data_dir)
        database = sqlite_file(config.audit_database_url)  # the task table lives in it too
        if database is not None and database.parent.is_dir():
            create_private_file(database)
        self.data_folder = DataFolderLock(config.data_dir)
        fed = config.federation
        self.tls = ReloadingTls(TlsFiles(fed.cert, fed.key, fed.ca, fed.crl, org=config.org))
        part = config.participant
        ca = config.participant_ca
        self.participant_tls = (
            ReloadingTls(TlsFiles(part.cert, part.key, ca))
            if part.cert is not None and part.key is not None and ca is not None
            else None
        )
        self.agents = AgentRegistry(config.org)
        self.peers = PeerRegistry(
            config.org, config.peers, self.tls, max_message_bytes=config.limits.max_message_bytes
        )
        self.policy = build_policy(config)
        verifier = Verifier.from_file(fed.ca)
        verifier.revoked_serials = lambda: self.tls.material.revoked_serials
        self.audit = (
            audit if audit is not None else open_store(config.audit_database_url, verifier=verifier)
        )
        if self.audit.verifier is None:
            self.audit.verifier = verifier
        self.router = Router(
            org=config.org,
            agents=self.agents,
            peers=self.peers,
            policy=self.policy,
            audit=self.audit,
            signer=Signer.from_files(fed.cert, fed.key),
            verifier=verifier,
            limits=Limits(config.limits.max_payload_depth, config.limits.max_payload_fields),
            store_payloads=config.audit.store_payloads,
            digest_key=load_or_create_digest_key(config.data_dir),
        )
        self.health = (
            health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        )
        self._federation = grpc.aio.server(options=_server_options(config))
        self._participant = grpc.aio.server(options=_server_options(config))
        limits = config.limits
        self.limiter = PeerLimiter(
            rate_per_second=limits.peer_rate_per_second,
            burst=limits.peer_burst,
            max_concurrent=limits.peer_max_concurrent_tasks,
        )
        self.delegations = DelegationVerifier(
            config.org, verifier, max_ttl_seconds=fed.delegation_max_ttl_seconds
        )
        self.router.delegation_ttl = fed.delegation_ttl_seconds
        self.tokens = token_authority(config) if config.participant.require_tokens else None
        self.tls.on_reload.append(self._follow_tls)
        add_servicer(
            self._federation,
            "Federation",
            FederationServicer(
                config,
                self.router,
                self.tls,
                self.limiter,
                self.delegations,
                own_head=self.router.steps.own_head,
            ),
        )
        add_servicer(
            self._participant,
            "Participant",
            ParticipantServicer(config, self.router, self.agents, self.tokens),
        )
        for server in (self._federation, self._participant):
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.a2a: A2AEdge | None = None
        if config.a2a is not None:
            from gateway.edges.a2a import A2AEdge  # a2a-sdk loads only when [a2a] is configured

            self.a2a = A2AEdge(config, config.a2a, self.router, self.agents, self.tokens)
        self._watch: asyncio.Task[None] | None = None
        self._exchange: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.ports: BoundPorts | None = None
        # Called with the bound ports as soon as both listeners are bound, before they serve.
        self.on_bound: list[Callable[[BoundPorts], object]] = []

    def _follow_tls(self, material: TlsMaterial) -> None:
        """Rotated files: sign with the new key and trust the new CA set, without a restart."""
        fed = self.config.federation
        self.router.signer = Signer.from_files(fed.cert, fed.key)
        self.router.verifier.trust(Verifier.from_pem(material.ca_pem).ca_certificates)

    async def start(self) -> BoundPorts:
        """Take the data folder, bind both listeners and start serving; returns the bound ports
        (port 0 picks one). A folder held by another gateway, or an address that cannot be
        bound, is a ConfigError that names it, and nothing is left running."""
        self.data_folder.acquire()
        try:
            fed_port = self._bind(
                self._federation,
                "federation",
                self.config.federation.listen,
                self.tls.server_credentials(),
            )
            part_port = self._bind(
                self._participant,
                "participant",
                self.config.participant.listen,
                None
                if self.participant_tls is None
                else self.participant_tls.server_credentials(require_client_auth=False),
            )
            for callback in self.on_bound:
                callback(BoundPorts(fed_port, part_port))
            await self.audit.start()
            await self.router.recover()
            await self._federation.start()
            await self._participant.start()
            if self.a2a is not None:
                await self.a2a.start()
        except BaseException:
            if self.a2a is not None:
                with contextlib.suppress(Exception):
                    await self.a2a.stop()
            await self._federation.stop(None)
            await self._participant.stop(None)
            for close in (self.router.stop_background, self.audit.close):
                with contextlib.suppress(Exception):
                    await close()
            self.data_folder.release()
            raise
        await _set_serving(self.health, True)
        if self.policy is not None and self.config.policy is not None and self.config.policy.watch:
            paths = [self.config.policy.model, self.config.policy.rules]
            self._watch = asyncio.ensure_future(self.policy.watch(paths))
        interval = self.config.audit.checkpoint_interval_seconds
        if interval > 0 and self.peers.names:
            self._exchange = asyncio.ensure_future(self._exchange_loop(interval))
        if self.config.gateway.task_retention_days > 0:
            self._retention = asyncio.ensure_future(self._retention_loop())
        self.ports = BoundPorts(fed_port, part_port)
        log.info(
            "gateway of %r serving: federation on port %d (mTLS), participants on port %d%s",
            self.config.org,
            fed_port,
            part_port,
            " (TLS)" if self.participant_tls is not None else "",
        )
        return self.ports

    def _bind(
        self,
        server: grpc.aio.Server,
        listener: str,
        address: str,
        credentials: grpc.ServerCredentials | None,
    ) -> int:
        """Bind one listener; an address that cannot be bound becomes one line with the fix."""
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc says only "Failed to bind to address"
            port = 0
        if not port:
            raise ConfigError(
                f"{self.config.source}: the {listener} listener cannot listen on {address}: "
                + _bind_problem(address, listener)
            )
        return int(port)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting tasks, let in-flight ones finish within `grace`, then close."""
        grace = self.config.gateway.shutdown_grace_seconds if grace is None else grace
        self.router.draining = True
        await _set_serving(self.health, False)
        if not await self.router.wait_idle(grace):
            log.warning(
                "%d tasks still running after the %.0fs grace period", self.router.in_flight, grace
            )
        for task in (self._watch, self._exchange, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.agents.close_all()
        if self.a2a is not None:
            await self.a2a.stop()
        await self.router.stop_background()
        await self._federation.stop(1.0)
        await self._participant.stop(1.0)
        await self.peers.close()
        await RefusalLog.for_store(self.audit).flush()  # the counts of refusal floods
        await self.audit.close()
        self.data_folder.release()

    async def exchange_checkpoints(self) -> dict[str, str]:
        """Send our signed audit head to every peer and keep theirs; report per peer."""
        outcome: dict[str, str] = {}
        ours = await self.audit.checkpoint(self.router.signer)
        for org in self.peers.names:
            try:
                reply = await self.peers.stub(org).ExchangeCheckpoint(
                    checkpoint_to_pb(ours), timeout=10
                )
                theirs = checkpoint_from_pb(reply)
                if theirs.org != org:
                    raise PermissionDenied(
                        f"checkpoint from {org!r} names organization {theirs.org!r}"
                    )
                await self.audit.store_peer_checkpoint(theirs)
                outcome[org] = f"exchanged: ours #{ours.sequence}, theirs #{theirs.sequence}"
            except grpc.aio.AioRpcError as exc:
                outcome[org] = f"failed: {exc.code().name}: {exc.details()}"
            except FedgateError as exc:
                outcome[org] = f"failed: {exc.message}"
        return outcome

    async def _retention_loop(self, every: float = 3_600.0) -> None:
        """Prune the task table of finished tasks past `[gateway] task_retention_days`, at
        start and then hourly (`fedgate tasks prune` does the same by hand)."""
        keep_ms = self.config.gateway.task_retention_days * 86_400_000
        while True:
            before = int(time.time() * 1000 - keep_ms)
            try:
                pruned = await asyncio.to_thread(self.audit.prune_tasks, before)
            except Exception as exc:  # the store may be down: try again at the next round
                log.warning("task table retention skipped: %s", type(exc).__name__)
            else:
                if pruned:
                    log.info("task table retention: %d finished tasks pruned", pruned)
            await asyncio.sleep(every)

    async def _exchange_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                for org, outcome in (await self.exchange_checkpoints()).items():
                    log.info("audit checkpoint with %s %s", org, outcome)
            except FedgateError as exc:
                log.warning("audit checkpoint exchange skipped: %s", exc.message)

    def reload_policy(self) -> None:
        if self.policy is not None:
            try:
                policy = self.policy.reload()
            except FedgateError as exc:
                log.error(
                    "policy reload refused, the previous policy keeps serving: %s", exc.message
                )
            else:
                log.info("policy reloaded: version %s", policy.version)


async def _set_serving(servicer: health.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", "fedgate.v1.Federation", "fedgate.v1.Participant"):
        result = servicer.set(service, status)
        if asyncio.iscoroutine(result):
            await result


def _bind_problem(address: str, listener: str) -> str:
    """Why `address` cannot be bound (asked of the OS, since grpc does not say) and the fix."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    fix = f"set another address in [{listener}] listen"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"{host!r} does not resolve ({exc}): {fix}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        "the address is already in use (another gateway, or another program): "
                        f"stop what listens there, or {fix}"
                    )
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"this host has no address {host}: {fix}"
                if exc.errno == errno.EACCES:
                    return (
                        f"binding port {port} needs privileges this process lacks: use a port "
                        f"above 1023, or {fix}"
                    )
                return f"{exc.strerror}: {fix}"
    return f"grpc refused to bind it: {fix}"


def settle_garbage_collector() -> None:
    """Once the gateway has started: what it built to serve (the compiled policy, Casbin's rule
    objects, certificates, the database layers: hundreds of thousands of objects) lives as long
    as the process, so it is moved out of the collector's sight (gc.freeze), and the youngest
    generation is collected less often. A full collection then walks only what exchanges
    allocate, not the whole heap each time (measured: 12% of a gateway's CPU on 1 MiB payloads
    went to gc_collect_main before)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


async def serve(config: GatewayConfig, *, handshakes: HandshakeLog | None = None) -> int:
    """Run a gateway until SIGTERM or SIGINT; returns the process exit status.

    `handshakes` (from the command line's grpc log tap) learns which port is which listener,
    so a refused TLS handshake names it.
    """
    # Whatever the gateway creates (databases and their WAL files, keys, ledgers) is ours alone.
    os.umask(0o077)
    gateway = Gateway(config)
    if handshakes is not None:
        gateway.on_bound.append(
            lambda ports: handshakes.listeners.update(
                {ports.federation: "federation", ports.participant: "participant"}
            )
        )
    # Before start: a SIGTERM while the gateway starts stops it cleanly once it has started,
    # and a SIGHUP (`fedgate policy reload` signals the pid in the pid file) reloads the policy.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_policy)
    # Written once the folder is ours and bound, so it is there when "serving" is logged.
    gateway.on_bound.append(lambda _: gateway.data_folder.write_pid_file())
    await gateway.start()
    settle_garbage_collector()
    try:
        await stop.wait()
        log.info(
            "stopping: no new tasks; waiting up to %.0fs for in-flight ones",
            config.gateway.shutdown_grace_seconds,
        )
    finally:
        # Removes the pid file, then lets the data folder go.
        await gateway.stop()
    return 0
