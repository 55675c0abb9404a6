"""The participant SDK: definition-time checks, public names, running a skill without a gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import participant_sdk
from participant_sdk import (
    Agent,
    AgentWorker,
    Client,
    InvalidArgument,
    NotFound,
    SkillDefinitionError,
    TaskContext,
)
from participant_sdk.testing import run_skill

SDK = Path(participant_sdk.__file__).resolve().parent


def test_public_names_are_pinned() -> None:
    assert sorted(participant_sdk.__all__) == [
        "Agent",
        "AgentWorker",
        "AllRoutesFailed",
        "Answer",
        "Cancelled",
        "Client",
        "DeadlineExceeded",
        "FallbackResult",
        "FanOutFailed",
        "FanOutResult",
        "FedgateError",
        "InvalidArgument",
        "NoAgreement",
        "NotFound",
        "PermissionDenied",
        "Quorum",
        "ResourceExhausted",
        "RetryPolicy",
        "SkillDefinitionError",
        "TaskContext",
        "TaskError",
        "TaskFailed",
        "TaskResult",
        "TaskUpdate",
        "Unauthenticated",
        "Unavailable",
        "majority",
        "quorum",
        "serve",
    ]


def test_sdk_never_imports_the_gateway() -> None:
    for path in SDK.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "gateway" or n.startswith("gateway.") for n in names), path


def test_duplicate_skill_name_raises_at_definition() -> None:
    agent = Agent("triage")

    @agent.skill
    async def assess(task: TaskContext, data: dict) -> dict:
        return {}

    with pytest.raises(SkillDefinitionError, match="already has a skill named 'assess'"):

        @agent.skill(name="assess")
        async def other(task: TaskContext, data: dict) -> dict:
            return {}


def test_sync_function_and_bad_signature_raise_at_definition() -> None:
    agent = Agent("triage")
    with pytest.raises(SkillDefinitionError, match="must be an async function"):

        @agent.skill
        def sync(task, data):  # type: ignore[no-untyped-def]
            return {}

    with pytest.raises(SkillDefinitionError, match="exactly two arguments"):

        @agent.skill
        async def one(task):  # type: ignore[no-untyped-def]
            return {}


@pytest.mark.parametrize("name", ["", "has space", "dots.bad", "x" * 64])
def test_bad_agent_names_are_refused(name: str) -> None:
    with pytest.raises(SkillDefinitionError, match="is not valid"):
        Agent(name)


def test_worker_needs_agents_with_skills() -> None:
    with pytest.raises(SkillDefinitionError, match="has no skills"):
        AgentWorker([Agent("empty")], "127.0.0.1:1")


async def test_run_skill_without_a_gateway() -> None:
    agent = Agent("triage")

    @agent.skill(input_schema={"type": "object"})
    async def assess(task: TaskContext, data: dict) -> dict:
        """Rate urgency."""
        return {"urgent": "fever" in data["symptoms"], "asked_by": task.requester_org}

    assert await run_skill(agent, "assess", {"symptoms": ["fever"]}, requester_org="insurer") == {
        "urgent": True,
        "asked_by": "insurer",
    }
    assert agent.card().skills[0].description == "Rate urgency."
    with pytest.raises(NotFound):
        await run_skill(agent, "nope", {})


async def test_skill_returning_a_non_dict_is_an_error() -> None:
    agent = Agent("triage")

    @agent.skill
    async def assess(task: TaskContext, data: dict) -> dict:
        return [1, 2]  # type: ignore[return-value]

    with pytest.raises(TypeError, match="expected a dict"):
        await run_skill(agent, "assess", {})


async def test_client_refuses_non_json_input_before_sending() -> None:
    async with Client("127.0.0.1:1") as client:
        with pytest.raises(InvalidArgument, match="not JSON-serializable"):
            await client.call("org/agent.skill", {"when": object()})
        with pytest.raises(InvalidArgument, match="must be a dict"):
            await client.call("org/agent.skill", [1])  # type: ignore[arg-type]


async def test_client_refuses_input_too_deep_to_encode() -> None:
    deep: dict = {}
    node = deep
    for _ in range(150):
        node["x"] = {}
        node = node["x"]
    async with Client("127.0.0.1:1") as client:
        with pytest.raises(InvalidArgument, match="nested too deeply"):
            await client.call("org/agent.skill", deep)
