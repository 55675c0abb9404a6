"""`fedgate tokens …`: issue, list and revoke the participant tokens of this gateway."""

from __future__ import annotations

import datetime as dt
import json
import time

import click
from rich.console import Console
from rich.table import Table

from gateway.cli._common import config_option, read_config
from gateway.identity.tokens import MAX_TTL_SECONDS, TokenAuthority, TokenRecord, token_authority


def _authority(config_path: str) -> TokenAuthority:
    return token_authority(read_config(config_path))


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _status(record: TokenRecord, now: float) -> str:
    if record.revoked:
        return "revoked"
    return "expired" if record.expires_at <= now else "active"


@click.group()
def tokens() -> None:
    """Participant tokens: which agents an SDK process may register and what it may call (and, for
    an operator token, reading `fedgate agents` and `fedgate peers`)."""


@tokens.command("issue")
@click.option("--subject", required=True, help="Who holds the token, e.g. records-service.")
@click.option(
    "--agent",
    "agents",
    multiple=True,
    metavar="NAME",
    help="An agent name it may register ('*' for any). Repeatable.",
)
@click.option(
    "--call",
    "calls",
    multiple=True,
    metavar="PATTERN",
    help="What it may call: ORG/AGENT.SKILL, ORG/AGENT, ORG/* or '*'. Repeatable.",
)
@click.option(
    "--operator",
    is_flag=True,
    help="It may read the running gateway's agents and peers (`fedgate agents`, `fedgate peers`).",
)
@click.option(
    "--ttl-days",
    default=30.0,
    show_default=True,
    type=float,
    help=f"Days until it expires (at most {MAX_TTL_SECONDS / 86_400:g}).",
)
@config_option
def issue(
    subject: str,
    agents: tuple[str, ...],
    calls: tuple[str, ...],
    operator: bool,
    ttl_days: float,
    config_path: str,
) -> None:
    """Issue a token and print it (alone on stdout, so that it can be captured)."""
    authority = _authority(config_path)
    token = authority.issue(
        subject, agents=agents, calls=calls, operator=operator, ttl_seconds=ttl_days * 86_400
    )
    click.echo(token)
    claims = authority.verify(token)
    click.echo(
        f"issued token {claims.token_id} for {subject!r}, expires {_iso(claims.expires_at)}",
        err=True,
    )


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@config_option
def list_tokens(as_json: bool, config_path: str) -> None:
    """List issued tokens (never the tokens themselves) and whether they were revoked."""
    records = _authority(config_path).list()
    now = time.time()
    if as_json:
        click.echo(
            json.dumps(
                [{**record.to_json(), "status": _status(record, now)} for record in records],
                indent=2,
                sort_keys=True,
            )
        )
        return
    table = Table(title=f"{len(records)} participant token(s)")
    for column in ("id", "subject", "agents", "calls", "operator", "issued", "expires", "status"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(
            record.token_id,
            record.subject,
            ", ".join(record.agents) or "-",
            ", ".join(record.calls) or "-",
            "yes" if record.operator else "-",
            _iso(record.issued_at),
            _iso(record.expires_at),
            _status(record, now),
        )
    Console(width=160, soft_wrap=False).print(table)


@tokens.command("revoke")
@click.argument("token_id")
@config_option
def revoke(token_id: str, config_path: str) -> None:
    """Revoke a token; a running gateway refuses it from its next request on."""
    _authority(config_path).revoke(token_id)
    click.echo(f"revoked token {token_id}: a running gateway refuses it at once")


COMMANDS: list[click.Command] = [tokens]
