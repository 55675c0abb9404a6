"""A2A agents and clients for the edge tests, written only with a2a-sdk (no Fedgate import)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import httpx
from a2a.client import Client, ClientCallContext, ClientConfig, ClientFactory
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types.a2a_pb2 import AgentCard, Message, Part, Role, SendMessageRequest, StreamResponse
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value

SECRET = "secret internal detail 4242"


@dataclass
class RecordingExecutor(AgentExecutor):
    """Keeps each message and request metadata it gets; answers by the first text part:

    report  an artifact with a text, a data and a file part, and a status message
    fail    fails, with a secret in its status message
    wait    works until canceled (the cancel is recorded)
    ask     asks for input
    else    completes with the status message "ok"
    """

    received: list[Message] = field(default_factory=list)
    metadata: list[dict[str, object]] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None and context.task_id and context.context_id
        self.received.append(message)
        self.metadata.append(context.metadata)
        self.task_ids.append(context.task_id)
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(message))
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        command = next((p.text for p in message.parts if p.WhichOneof("content") == "text"), "")
        if command == "report":
            await updater.add_artifact(
                [
                    Part(text="the diagnosis is confidential"),
                    Part(data=json_format.ParseDict({"total": 42, "ssn": "078-05-1120"}, Value())),
                    Part(raw=b"scan bytes", filename="scan.png", media_type="image/png"),
                ],
                name="report",
            )
            await updater.complete(updater.new_agent_message([Part(text="report ready")]))
        elif command == "fail":
            await updater.failed(updater.new_agent_message([Part(text=SECRET)]))
        elif command == "wait":
            await updater.start_work()
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if context.task_id not in self.canceled:
                    self.canceled.append(context.task_id)
                raise
            await updater.complete()
        elif command == "ask":
            await updater.requires_input(updater.new_agent_message([Part(text="which patient?")]))
        else:
            await updater.complete(updater.new_agent_message([Part(text="ok")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        if context.task_id not in self.canceled:
            self.canceled.append(context.task_id)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def text_message(text: str, *, message_id: str = "m-1", context_id: str = "") -> Message:
    return Message(
        message_id=message_id, role=Role.ROLE_USER, context_id=context_id, parts=[Part(text=text)]
    )


def request(message: Message, **gateway_options: object) -> SendMessageRequest:
    send = SendMessageRequest(message=message)
    if gateway_options:
        send.metadata.update({"fedgate": gateway_options})
    return send


def call_context(token: str | None = None, timeout: float = 30.0) -> ClientCallContext:
    return ClientCallContext(
        timeout=timeout,
        service_parameters={"authorization": f"Bearer {token}"} if token else None,
    )


@contextlib.asynccontextmanager
async def a2a_client(
    card_url: str,
    transport: str = "JSONRPC",
    *,
    token: str | None = None,
    streaming: bool = True,
    ca: str | None = None,
) -> AsyncIterator[tuple[Client, AgentCard]]:
    """An a2a-sdk client of the agent whose card is at `card_url`, over one transport
    (over TLS, trusting `ca`, when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
    async with httpx.AsyncClient(headers=headers, timeout=30, verify=verify) as http:
        response = await http.get(card_url)
        response.raise_for_status()
        card = parse_agent_card(response.json())
        channels: list[grpc.aio.Channel] = []

        def channel(url: str) -> grpc.aio.Channel:
            if ca:
                with open(ca, "rb") as root:
                    credentials = grpc.ssl_channel_credentials(root_certificates=root.read())
                channels.append(grpc.aio.secure_channel(url, credentials))
            else:
                channels.append(grpc.aio.insecure_channel(url))
            return channels[-1]

        factory = ClientFactory(
            ClientConfig(
                streaming=streaming,
                httpx_client=http,
                grpc_channel_factory=channel,
                supported_protocol_bindings=[transport],
            )
        )
        client = factory.create(card)
        try:
            yield client, card
        finally:
            await client.close()
            for open_channel in channels:
                await open_channel.close()


async def send(
    client: Client, message: Message, token: str | None = None, **options: object
) -> list[StreamResponse]:
    """Every response of one send, in order."""
    return [
        response
        async for response in client.send_message(
            request(message, **options), context=call_context(token)
        )
    ]
