"""`fedgate tasks`: see and prune the task table (the results kept for retries and `get`).

The task table keeps what a gateway released or received for each task, so that a retry with
the key gets the same answer. That is data at rest: `[gateway] task_retention_days` bounds it
(the gateway prunes hourly), and these commands show and prune it by hand. Only finished tasks
are pruned; a key whose task was pruned runs again if it is used again.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import click
from rich.console import Console
from rich.table import Table

from gateway.cli._common import config_option, read_config
from gateway.cli.audit import _open
from gateway.exchange.tasks import TaskState
from gateway.store.task_table import TaskRow

_STATES = [state.value for state in TaskState]


def _when(unix_ms: int) -> str:
    return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row_json(row: TaskRow) -> dict[str, object]:
    """What the table says of a task: never its input or output."""
    return {
        "task_id": row.task_id,
        "origin_org": row.origin_org,
        "target": row.target,
        "requester": row.requester,
        "remote": row.remote,
        "state": row.state.value,
        "created": _when(row.created_ms),
        "updated": _when(row.updated_ms),
    }


@click.group("tasks")
def tasks() -> None:
    """See and prune the task table (results kept for retries and `get`)."""


@tasks.command("list")
@config_option
@click.option("--state", type=click.Choice(_STATES), help="Only tasks in this state.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_tasks(config_path: str, state: str | None, limit: int, as_json: bool) -> None:
    """The newest tasks, with how many the table holds per state (no payloads)."""
    config = read_config(config_path)
    with _open(config) as store:
        rows = store.task_overview(state=state, limit=limit)
        counts = store.task_counts()
    if as_json:
        click.echo(json.dumps({"counts": counts, "tasks": [_row_json(r) for r in rows]}, indent=2))
        return
    table = Table(title=f"task table of {config.org}", title_justify="left")
    for column in ("task", "from", "target", "requester", "state", "updated (UTC)"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row.task_id,
            row.origin_org,
            row.target,
            row.requester,
            row.state.value,
            _when(row.updated_ms),
        )
    console = Console()
    console.print(table)
    retention = config.gateway.task_retention_days
    console.print(
        "held: "
        + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing")
        + f"; retention {retention:g} days ([gateway] task_retention_days"
        + (", 0: kept forever)" if not retention else ")")
    )


@tasks.command("prune")
@config_option
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0),
    help="Finished tasks last updated longer ago than this (default: the configured retention).",
)
def prune_tasks(config_path: str, older_than_days: float | None) -> None:
    """Delete finished tasks past the retention; running tasks are never pruned."""
    config = read_config(config_path)
    days = config.gateway.task_retention_days if older_than_days is None else older_than_days
    if days <= 0 and older_than_days is None:
        click.echo(
            "nothing pruned: [gateway] task_retention_days is 0 (kept forever); pass "
            "--older-than-days to prune by hand"
        )
        return
    before = int(time.time() * 1000 - days * 86_400_000)
    with _open(config) as store:
        pruned = store.prune_tasks(before)
    click.echo(
        f"pruned {pruned} finished task(s) last updated more than {days:g} days ago; a key of "
        "theirs used again runs again"
    )


COMMANDS = [tasks]
