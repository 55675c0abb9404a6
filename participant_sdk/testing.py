"""Run a skill without a gateway, for an agent developer's own tests.

result = await run_skill(triage, "assess", {"symptoms": ["fever"]}, requester_org="insurer")
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from participant_sdk._agent import Agent, run_skill_function
from participant_sdk._errors import NotFound
from participant_sdk._types import TaskContext, scoped_task_key

# The organization a skill run by `run_skill` belongs to (it has no gateway to name one).
LOCAL_ORG = "local"


async def run_skill(
    agent: Agent,
    skill: str,
    data: dict[str, Any],
    *,
    requester_org: str = "local",
    requester: str = "test",
    timeout: float = 30.0,  # noqa: ASYNC109 - the task's deadline, held as a gateway's worker does
    task_id: str | None = None,
    idempotency_key: str = "",
) -> dict[str, Any]:
    """Call one skill of `agent` directly, with a TaskContext like the gateway would give.

    The deadline holds as under a gateway: when `timeout` passes, `task.cancelled` is set, the
    skill is cancelled and DeadlineExceeded is raised. `task.idempotency_key` is scoped from
    `requester_org`, `requester`, the target (organization "local") and `idempotency_key` (the
    task id when empty), as a gateway's worker scopes it.
    """
    spec = agent.skills.get(skill)
    if spec is None:
        raise NotFound(f"agent {agent.name!r} has no skill {skill!r}")
    task_id = task_id or str(uuid.uuid4())
    context = TaskContext(
        task_id=task_id,
        requester_org=requester_org,
        requester=requester,
        agent=agent.name,
        skill=skill,
        deadline=time.time() + timeout,
        idempotency_key=scoped_task_key(
            requester_org, requester, f"{LOCAL_ORG}/{agent.name}.{skill}", idempotency_key, task_id
        ),
    )
    return await run_skill_function(spec, context, data)


__all__ = ["LOCAL_ORG", "run_skill"]
