"""The A2A TCK's scenario agent, written only with a2a-sdk (no Fedgate import).

It does what `../shared/a2a-tck/scenarios/*.feature` say for each message-id prefix, and serves
JSON-RPC, HTTP+JSON and gRPC with the SDK's own request handler, like any A2A agent an
organization already runs. Run it alone (the reference the gateway is compared with):

    python -m tests.a2a.scenario_agent --port 9999        # gRPC on port + 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass

import grpc
import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler, GrpcHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2_grpc
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    Part,
)
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from starlette.applications import Starlette

REST_PATH = "/rest"
STREAMING_TIMEOUT_SECONDS = 2.0  # the TCK's; the resubscription scenario waits twice as long


class ScenarioExecutor(AgentExecutor):
    """Behaviour keyed by the message id's prefix (scenarios/*.feature)."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None and context.task_id and context.context_id
        prefix = message.message_id
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        if prefix.startswith("tck-message-response"):
            await event_queue.enqueue_event(
                updater.new_agent_message([Part(text="Direct message response")])
            )
            return
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(message))
        text_file = Part(raw=b"tck", media_type="text/plain", filename="output.txt")
        streamed = {
            "tck-stream-001": "Stream hello from TCK",
            "tck-stream-003": "Stream task lifecycle",
            "tck-stream-ordering-001": "Ordered output",
            "tck-stream-artifact-text": "Streamed text content",
        }
        for key, text in streamed.items():
            if prefix.startswith(key):
                await updater.start_work()
                await updater.add_artifact([Part(text=text)])
                await updater.complete()
                return
        if prefix.startswith("tck-stream-artifact-file"):
            await updater.start_work()
            await updater.add_artifact([text_file])
            await updater.complete()
        elif prefix.startswith("tck-stream-artifact-chunked"):
            await updater.start_work()
            await updater.add_artifact([Part(text="chunk-1 ")], artifact_id="chunked")
            await updater.add_artifact(
                [Part(text="chunk-2")], artifact_id="chunked", append=True, last_chunk=True
            )
            await updater.complete()
        elif prefix.startswith("tck-stream-002"):
            await updater.complete()
        elif prefix.startswith("test-resubscribe-message-id"):
            await updater.start_work()
            await asyncio.sleep(2 * STREAMING_TIMEOUT_SECONDS)
            await updater.complete()
        elif prefix.startswith("tck-artifact-text"):
            await updater.add_artifact([Part(text="Generated text content")])
            await updater.complete()
        elif prefix.startswith("tck-artifact-file-url"):
            await updater.add_artifact(
                [
                    Part(
                        url="https://example.com/output.txt",
                        media_type="text/plain",
                        filename="output.txt",
                    )
                ]
            )
            await updater.complete()
        elif prefix.startswith("tck-artifact-file"):
            await updater.add_artifact([text_file])
            await updater.complete()
        elif prefix.startswith("tck-artifact-data"):
            data = json_format.Parse('{"key": "value", "count": 42}', Value())
            await updater.add_artifact([Part(data=data)])
            await updater.complete()
        elif prefix.startswith("tck-input-required"):
            await updater.requires_input()
        elif prefix.startswith("tck-reject-task"):
            await updater.reject(updater.new_agent_message([Part(text="rejected")]))
        elif prefix.startswith("tck-complete-task"):
            await updater.complete(updater.new_agent_message([Part(text="Hello from TCK")]))
        else:
            await updater.complete(
                updater.new_agent_message([Part(text=f"Unhandled messageId prefix: {prefix}")])
            )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def scenario_card(
    host: str,
    http_port: int,
    grpc_port: int | None,
    *,
    name: str = "TCK scenario agent",
    skills: tuple[str, ...] = ("tck",),
    streaming: bool = True,
) -> AgentCard:
    interfaces = [
        AgentInterface(
            url=f"http://{host}:{http_port}", protocol_binding="JSONRPC", protocol_version="1.0"
        ),
        AgentInterface(
            url=f"http://{host}:{http_port}{REST_PATH}",
            protocol_binding="HTTP+JSON",
            protocol_version="1.0",
        ),
    ]
    if grpc_port is not None:
        interfaces.append(
            AgentInterface(
                url=f"{host}:{grpc_port}", protocol_binding="GRPC", protocol_version="1.0"
            )
        )
    return AgentCard(
        name=name,
        description="Does what the A2A TCK's scenarios say for each message-id prefix",
        version="1.0.0",
        provider=AgentProvider(organization="A2A TCK", url="https://github.com/a2aproject"),
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(streaming=streaming, push_notifications=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(id=skill, name=skill, description=f"skill {skill}", tags=["tck"])
            for skill in skills
        ],
    )


def _current(card: AgentCard) -> Callable[[AgentCard], Awaitable[AgentCard]]:
    """Serve the card object as it is now: a test may change it while the agent runs."""

    async def modifier(_: AgentCard) -> AgentCard:
        return card

    return modifier


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process that embeds the agent keeps its signals


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Served:
    card_url: str
    base_url: str
    grpc_address: str | None
    card: AgentCard
    stop: Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve_scenario_agent(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    grpc_port: int | None = 0,
    executor: AgentExecutor | None = None,
    card: Callable[[str, int, int | None], AgentCard] = scenario_card,
) -> AsyncIterator[Served]:
    """Serve an A2A agent (the scenario agent unless `executor` says otherwise) on `host`
    (port 0 picks one) for the duration of the block."""
    sock = _listening(host, port)
    http_port = sock.getsockname()[1]
    grpc_server = None
    if grpc_port is not None:
        grpc_server = grpc.aio.server()
        grpc_port = grpc_server.add_insecure_port(f"{host}:{grpc_port}")
    served_card = card(host, http_port, grpc_port)
    handler = DefaultRequestHandler(
        agent_executor=executor or ScenarioExecutor(),
        task_store=InMemoryTaskStore(),
        agent_card=served_card,
    )
    app = Starlette(
        routes=[
            *create_agent_card_routes(served_card, card_modifier=_current(served_card)),
            *create_jsonrpc_routes(handler, "/"),
            *create_rest_routes(handler, path_prefix=REST_PATH),
        ]
    )
    server = _Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    )
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    if grpc_server is not None:
        a2a_pb2_grpc.add_A2AServiceServicer_to_server(GrpcHandler(handler), grpc_server)
        await grpc_server.start()
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        if grpc_server is not None:
            await grpc_server.stop(0.5)
        await handler.aclose()
        sock.close()

    try:
        yield Served(
            card_url=f"http://{host}:{http_port}/.well-known/agent-card.json",
            base_url=f"http://{host}:{http_port}",
            grpc_address=f"{host}:{grpc_port}" if grpc_port is not None else None,
            card=served_card,
            stop=stop,
        )
    finally:
        await stop()


async def _main(port: int) -> None:
    async with serve_scenario_agent("127.0.0.1", port, grpc_port=port + 1) as served:
        print(f"scenario agent: {served.base_url} (gRPC {served.grpc_address})", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9999)
    asyncio.run(_main(parser.parse_args().port))
