"""The lab's pathology agent for the demo: an A2A server written only with a2a-sdk.

It imports nothing of Fedgate (a test holds it to that): it stands for an agent an organization
already runs, which the lab's gateway offers to partners under the lab's policy (A2A out).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field

import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Part,
)
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from starlette.applications import Starlette

REPORT_PDF = b"%PDF-1.4 pathology report P-1001 (demo)"


@dataclass
class PathologyExecutor(AgentExecutor):
    """Answers a request for a test result with a report: a narrative, the values, the PDF."""

    received: list[Message] = field(default_factory=list)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None and context.task_id and context.context_id
        self.received.append(message)
        await event_queue.enqueue_event(new_task_from_user_message(message))
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.start_work()
        asked: dict[str, object] = next(
            (json_format.MessageToDict(p.data) for p in message.parts if p.HasField("data")), {}
        )
        values = {
            "test": asked.get("test", "HbA1c"),
            "result": "6.1 %",
            "reference_range": "4.0-5.6 %",
            "technician": "J. Okafor",
        }
        await updater.add_artifact(
            [
                Part(text="Elevated HbA1c; patient reports fatigue; recommend follow-up."),
                Part(data=json_format.ParseDict(values, Value())),
                Part(raw=REPORT_PDF, filename="report.pdf", media_type="application/pdf"),
            ],
            name="pathology-report",
        )
        await updater.complete(updater.new_agent_message([Part(text="report ready")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def pathology_card(url: str) -> AgentCard:
    return AgentCard(
        name="Pathology",
        description="Laboratory pathology reports",
        version="2.3.0",
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=f"{url}/rest", protocol_binding="HTTP+JSON", protocol_version="1.0"),
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json", "text/plain", "application/pdf"],
        skills=[
            AgentSkill(
                id="report",
                name="Pathology report",
                description="The report of a laboratory test",
                tags=["lab"],
            )
        ],
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class RunningAgent:
    card_url: str
    executor: PathologyExecutor


@contextlib.asynccontextmanager
async def serve_pathology_agent(host: str = "127.0.0.1") -> AsyncIterator[RunningAgent]:
    """Serve the agent on a free loopback port for the duration of the block."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(64)
    sock.setblocking(False)
    url = f"http://{host}:{sock.getsockname()[1]}"
    card = pathology_card(url)
    executor = PathologyExecutor()
    handler = DefaultRequestHandler(
        agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card
    )
    app = Starlette(
        routes=[
            *create_agent_card_routes(card),
            *create_jsonrpc_routes(handler, "/"),
            *create_rest_routes(handler, path_prefix="/rest"),
        ]
    )
    server = _Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    )
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        yield RunningAgent(f"{url}/.well-known/agent-card.json", executor)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        await handler.aclose()
        sock.close()
