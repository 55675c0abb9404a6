"""The task table's retention (issue 11 #6): `fedgate tasks list` shows what it holds (never a
payload), `fedgate tasks prune` and the gateway's own retention delete finished tasks only."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from gateway.audit.store import MemoryAuditStore, SqlAuditStore
from gateway.cli import main
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskState
from gateway.local import LocalFederation
from gateway.store.task_table import task_key
from participant_sdk import Client
from tests.integration.federation import echo_agent, eventually, serving, slow_agent


def _spec(task_id: str) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        target_org="hospital",
        agent="echo",
        skill="say",
        input={"secret": "do-not-show"},
        deadline=time.time() + 60,
    )


async def test_prune_deletes_only_finished_tasks_past_the_cut(tmp_path: Path) -> None:
    for store in (MemoryAuditStore(), SqlAuditStore(f"sqlite:///{tmp_path / 'f.db'}")):
        await store.start()
        for task_id in ("old-done", "running"):
            await store.tasks.accept("insurer", _spec(task_id), remote=False)
        key = task_key("insurer", _spec("old-done"))[1]
        await store.tasks.finish("insurer", key, TaskResult("old-done", TaskState.COMPLETED))
        assert store.prune_tasks(int(time.time() * 1000) - 60_000) == 0, "not old enough"
        assert store.prune_tasks(int(time.time() * 1000) + 1_000) == 1
        assert [r.task_id for r in await store.tasks.unfinished()] == ["running"]
        assert store.task_counts() == {"working": 1}
        await store.close()


async def test_the_commands_show_and_prune_the_table_of_a_gateway(fed: LocalFederation) -> None:
    async with (
        serving(fed.participant("hospital"), echo_agent(), slow_agent()),
        Client(fed.participant("insurer")) as client,
    ):
        await client.call("hospital/echo.say", {"secret": "do-not-show"}, timeout=10, task_id="t-1")
        running = asyncio.ensure_future(
            client.call("hospital/slow.wait", {"seconds": 30}, timeout=20, task_id="t-2")
        )
        assert await eventually(lambda: fed["hospital"].router.in_flight, 10)
        config = str(fed["hospital"].config.source)
        runner = CliRunner()
        listed = runner.invoke(main, ["tasks", "list", "--config", config, "--json"])
        assert listed.exit_code == 0, listed.output
        shown = json.loads(listed.output)
        assert {t["task_id"]: t["state"] for t in shown["tasks"]} == {
            "t-1": "completed",
            "t-2": "working",
        }
        assert "do-not-show" not in listed.output, "the table's listing shows no payload"
        pruned = runner.invoke(
            main, ["tasks", "prune", "--config", config, "--older-than-days", "0"]
        )
        assert pruned.exit_code == 0, pruned.output
        assert "pruned 1 finished task" in pruned.output
        again = json.loads(
            runner.invoke(main, ["tasks", "list", "--config", config, "--json"]).output
        )
        assert [t["task_id"] for t in again["tasks"]] == ["t-2"], "running tasks are kept"
        running.cancel()


async def test_prune_with_retention_off_prunes_nothing_and_says_how(
    tmp_path: Path, audit_make_config: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'fedgate.db'}"
    store = SqlAuditStore(url)
    await store.start()
    await store.tasks.accept("insurer", _spec("done"), remote=False)
    key = task_key("insurer", _spec("done"))[1]
    await store.tasks.finish("insurer", key, TaskResult("done", TaskState.COMPLETED))
    await store.close()
    config = audit_make_config(tmp_path, "alpha", url)
    config.write_text(
        config.read_text().replace("[gateway]\n", "[gateway]\ntask_retention_days = 0\n")
    )
    result = CliRunner().invoke(main, ["tasks", "prune", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "nothing pruned: [gateway] task_retention_days is 0 (kept forever)" in result.output
    assert "--older-than-days" in result.output, "it names how to prune by hand"
    listed = json.loads(
        CliRunner().invoke(main, ["tasks", "list", "--config", str(config), "--json"]).output
    )
    assert listed["counts"] == {"completed": 1}
