"""Run a skill without a gateway, for an agent developer's own tests.

result = await run_skill(triage, "assess", {"symptoms": ["fever"]}, requester_org="insurer")
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from participant_sdk._agent import Agent, run_skill_function
from participant_sdk._errors import NotFound
from participant_sdk._types import TaskContext


async def run_skill(
    agent: Agent,
    skill: str,
    data: dict[str, Any],
    *,
    requester_org: str = "local",
    requester: str = "test",
    timeout: float = 30.0,  # noqa: ASYNC109 - sets the task's deadline, as a gateway would
) -> dict[str, Any]:
    """Call one skill of `agent` directly, with a TaskContext like the gateway would give."""
    spec = agent.skills.get(skill)
    if spec is None:
        raise NotFound(f"agent {agent.name!r} has no skill {skill!r}")
    context = TaskContext(
        task_id=str(uuid.uuid4()),
        requester_org=requester_org,
        requester=requester,
        agent=agent.name,
        skill=skill,
        deadline=time.time() + timeout,
    )
    return await run_skill_function(spec, context, data)


__all__ = ["run_skill"]
