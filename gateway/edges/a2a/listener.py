"""The A2A listeners and their start and stop: built from `[a2a]`, one function each.

    GET  /a2a/{org}/{agent}/.well-known/agent-card.json   the card (only agents the caller may call)
    POST /a2a/{org}/{agent}/jsonrpc  (and .../jsonrpc/)    JSON-RPC binding
         /a2a/{org}/{agent}/rest/...                       HTTP+JSON binding
    GET  /a2a/agents                                       the cards this caller may reach
    gRPC lf.a2a.v1.A2AService on [a2a] grpc_listen         the agent is the request's tenant

The HTTP side runs on uvicorn in the gateway's own event loop (the gateway keeps its signals);
bodies over `[limits] max_message_bytes` are refused before any handler reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import uvicorn
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_jsonrpc_routes, create_rest_routes
from a2a.types import a2a_pb2_grpc
from a2a.utils.errors import A2AError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import A2ASection, GatewayConfig
from gateway.edges.a2a.cards import CardDirectory, Target
from gateway.edges.a2a.errors import GatewayError, GatewayGrpcHandler, register_with_sdk
from gateway.edges.a2a.inbound import (
    STATE_TARGET,
    Authenticator,
    GatewayRequestHandler,
    GrpcContextBuilder,
    HttpContextBuilder,
    InboundEdge,
)
from gateway.edges.a2a.mapping import CONTEXT_KEY_FILE, load_or_create_context_key
from gateway.edges.a2a.outbound import A2AAgentBackend
from gateway.edges.a2a.port import ExchangePort
from gateway.errors import ConfigError
from gateway.exchange.agents import AgentRegistry
from gateway.exchange.router import Router
from gateway.identity.tokens import TokenAuthority

log = logging.getLogger("fedgate.a2a")

PREFIX = "/a2a/{org}/{agent}"


class _RefusalsWithoutTracebacks(logging.Filter):
    """The SDK logs an executor's exception with its traceback; a refusal of the gateway (an
    A2AError it raised on purpose, its message naming cause and fix) needs one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], A2AError):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_sdk_logging() -> None:
    """The SDK's debug logs print whole messages and tasks (payload values): never below INFO
    (guarantee 9); and its tracebacks of the gateway's own refusals become one line."""
    sdk = logging.getLogger("a2a")
    if sdk.getEffectiveLevel() < logging.INFO:
        sdk.setLevel(logging.INFO)
    for name in ("a2a.server.agent_execution.active_task",):
        target = logging.getLogger(name)
        if not any(isinstance(f, _RefusalsWithoutTracebacks) for f in target.filters):
            target.addFilter(_RefusalsWithoutTracebacks())


@dataclass(frozen=True)
class A2APorts:
    http: int | None
    grpc: int | None


class _Server(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway, not uvicorn, owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, before the application reads it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await JSONResponse(
                    {
                        "error": {
                            "code": 413,
                            "status": "INVALID_ARGUMENT",
                            "message": (
                                f"the request body is over {self.limit} bytes: send less, or "
                                "raise [limits] max_message_bytes"
                            ),
                        }
                    },
                    status_code=413,
                )(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _error(error: GatewayError) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "code": error.http_status,
                "status": error.grpc_status.name,
                "message": error.message,
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": error.reason,
                        "domain": "a2a-protocol.org",
                    }
                ],
            }
        },
        status_code=error.http_status,
        headers={"WWW-Authenticate": "Bearer"} if error.http_status == 401 else None,
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the A2A HTTP listener stopped: %s", task.exception())


class A2AEdge:
    """Both A2A edges of one gateway: the listener for our clients, and our A2A agents."""

    def __init__(
        self,
        config: GatewayConfig,
        section: A2ASection,
        router: Router,
        agents: AgentRegistry,
        tokens: TokenAuthority | None,
    ) -> None:
        register_with_sdk()
        quiet_sdk_logging()
        self.config = config
        self.section = section
        self.port = ExchangePort(router)
        self.context_key = load_or_create_context_key(config.data_dir / CONTEXT_KEY_FILE)
        self.directory = CardDirectory(self.port, refresh_seconds=section.card_refresh_seconds)
        self._http_port: int | None = None
        self._grpc_port: int | None = None
        self.edge = InboundEdge(
            port=self.port,
            directory=self.directory,
            auth=Authenticator(tokens),
            context_key=self.context_key,
            max_file_bytes=section.max_file_bytes,
            default_deadline=config.gateway.default_deadline_seconds,
            max_deadline=config.gateway.max_deadline_seconds,
            default_target=(
                Target.parse(section.grpc_default_agent) if section.grpc_default_agent else None
            ),
            task_capacity=section.max_tasks_kept,
            base_url=self.base_url,
            grpc_address=self.grpc_address,
        )
        self.handler = GatewayRequestHandler(self.edge)
        self._http_client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self.backends = [
            A2AAgentBackend(
                agent.name,
                agent.card_url,
                org=config.org,
                context_key=self.context_key,
                max_file_bytes=section.max_file_bytes,
                refresh_seconds=section.card_refresh_seconds,
                http=self._http_client,
            )
            for agent in section.agents
        ]
        for backend in self.backends:
            agents.add_backend(backend)
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None

    # ---- addresses -----------------------------------------------------------------------

    @property
    def _tls(self) -> bool:
        return self.section.tls_cert is not None

    def base_url(self) -> str:
        if self.section.public_url:
            return self.section.public_url.rstrip("/")
        host = self.section.listen.rpartition(":")[0]
        return f"{'https' if self._tls else 'http'}://{host}:{self._http_port}"

    def grpc_address(self) -> str | None:
        if self._grpc_port is None:
            return None
        if self.section.grpc_public_address:
            return self.section.grpc_public_address
        return f"{self.section.grpc_listen.rpartition(':')[0]}:{self._grpc_port}"

    @property
    def ports(self) -> A2APorts:
        return A2APorts(self._http_port, self._grpc_port)

    # ---- HTTP ----------------------------------------------------------------------------

    async def _card(self, request: Request) -> Response:
        """The card of one agent, for a caller that may call at least one of its skills."""
        try:
            caller = self.edge.auth.caller(request.headers.get("authorization"))
            target = Target(request.path_params["org"], request.path_params["agent"])
            state: dict[str, Any] = {STATE_TARGET: target}
            _, card, _ = await self.handler.resolve(ServerCallContext(state=state, user=caller))
        except GatewayError as exc:
            return _error(exc)
        return JSONResponse(agent_card_to_dict(self.edge.card_for(card, caller)))

    async def _directory(self, request: Request) -> Response:
        """Where the cards of every agent this caller may reach are."""
        try:
            caller = self.edge.auth.caller(request.headers.get("authorization"))
        except GatewayError as exc:
            return _error(exc)
        base = self.base_url()
        listed = [
            {
                "name": f"{card.org}/{card.name}",
                "card_url": f"{base}/a2a/{card.org}/{card.name}/.well-known/agent-card.json",
                "skills": [s.name for s in caller.callable_skills(card)],
            }
            for card in await self.directory.reachable()
            if caller.callable_skills(card)
        ]
        return JSONResponse({"agents": listed})

    def app(self) -> ASGIApp:
        builder = HttpContextBuilder(self.edge.auth)
        routes: list[BaseRoute] = [
            Route(f"{PREFIX}/.well-known/agent-card.json", self._card, methods=["GET"]),
            Route("/a2a/agents", self._directory, methods=["GET"]),
        ]
        for url in (f"{PREFIX}/jsonrpc", f"{PREFIX}/jsonrpc/"):
            routes += create_jsonrpc_routes(self.handler, url, context_builder=builder)
        routes += create_rest_routes(
            self.handler, context_builder=builder, path_prefix=f"{PREFIX}/rest"
        )
        app = Starlette(routes=routes)
        app.router.redirect_slashes = False
        return BodyLimit(app, self.config.limits.max_message_bytes)

    # ---- start and stop ------------------------------------------------------------------

    async def start(self) -> A2APorts:
        for backend in self.backends:
            await backend.refresh()
            backend.start()
        section = self.section
        if section.grpc_listen:
            self._grpc = grpc.aio.server(
                options=[
                    ("grpc.max_send_message_length", self.config.limits.max_message_bytes),
                    ("grpc.max_receive_message_length", self.config.limits.max_message_bytes),
                    ("grpc.so_reuseport", 0),
                ]
            )
            a2a_pb2_grpc.add_A2AServiceServicer_to_server(
                GatewayGrpcHandler(self.handler, GrpcContextBuilder(self.edge.auth)), self._grpc
            )
            if self._tls:
                assert section.tls_cert is not None and section.tls_key is not None
                credentials = grpc.ssl_server_credentials(
                    [(section.tls_key.read_bytes(), section.tls_cert.read_bytes())]
                )
                port = self._grpc.add_secure_port(section.grpc_listen, credentials)
            else:
                port = self._grpc.add_insecure_port(section.grpc_listen)
            if not port:
                raise ConfigError(
                    f"{self.config.source}: a2a.grpc_listen: cannot bind {section.grpc_listen}"
                )
            self._grpc_port = port
            await self._grpc.start()
        if section.listen:
            host, _, port_text = section.listen.rpartition(":")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host.strip("[]"), int(port_text)))
            except OSError as exc:
                sock.close()
                raise ConfigError(
                    f"{self.config.source}: a2a.listen: cannot bind {section.listen}: "
                    f"{exc.strerror}"
                ) from None
            sock.listen(128)
            sock.setblocking(False)
            self._http_port = sock.getsockname()[1]
            server_config = uvicorn.Config(
                self.app(),
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=1,
                ssl_certfile=str(section.tls_cert) if section.tls_cert else None,
                ssl_keyfile=str(section.tls_key) if section.tls_key else None,
            )
            self._server = _Server(server_config)
            self._serving = asyncio.ensure_future(self._server.serve(sockets=[sock]))
            # The socket listens already: connections wait in its backlog until uvicorn serves.
            self._serving.add_done_callback(_log_failure)
        log.info(
            "A2A edge of %r: HTTP on %s, gRPC on %s, %d A2A agents",
            self.config.org,
            self.base_url() if self._http_port else "off",
            self.grpc_address() or "off",
            len(self.backends),
        )
        return self.ports

    async def stop(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._serving
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        await self.handler.aclose()
        for backend in self.backends:
            await backend.close()
        await self._http_client.aclose()


__all__ = ["A2AEdge", "A2APorts"]
