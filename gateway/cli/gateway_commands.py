"""Operator commands: init, serve, certs, agents, demo."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.table import Table

from gateway.cli._common import config_option, read_config
from gateway.config import ORG_NAME
from gateway.errors import ConfigError
from gateway.identity.certs import (
    DEV_WARNING,
    IssuedCert,
    create_ca,
    issue_gateway_cert,
    write_pair,
)

STARTER_MODEL = Path(__file__).resolve().parent.parent / "resources" / "model.conf"


def _org_name(ctx: click.Context, param: click.Parameter, value: str | tuple[str, ...]) -> object:
    for name in [value] if isinstance(value, str) else value:
        if name is not None and not ORG_NAME.match(name):
            raise click.BadParameter(
                f"{name!r} is not a valid organization name: lowercase letters, digits and hyphens"
            )
    return value


@click.command()
@click.option(
    "--org", required=True, callback=_org_name, help="Your organization's name, e.g. hospital."
)
@click.option(
    "--dir", "directory", default=".", type=click.Path(file_okay=False), show_default=True
)
@click.option("--federation-listen", default="127.0.0.1:7443", show_default=True)
@click.option("--participant-listen", default="127.0.0.1:7400", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing fedgate.toml.")
def init(
    org: str, directory: str, federation_listen: str, participant_listen: str, force: bool
) -> None:
    """Create a starter fedgate.toml, data folder, deny-all policy and development certificates."""
    from gateway.policy.engine import load_or_create_pseudonym_key

    root = Path(directory)
    config_path = root / "fedgate.toml"
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path}: already exists: pass --force to overwrite it")
    (root / "data").mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    if not (certs / "ca.crt").exists():
        ca = create_ca()
        write_pair(ca, certs / "ca.crt", certs / "ca.key")
    else:
        ca = IssuedCert((certs / "ca.crt").read_bytes(), (certs / "ca.key").read_bytes())
    if not (certs / f"{org}.crt").exists():
        write_pair(issue_gateway_cert(ca, org), certs / f"{org}.crt", certs / f"{org}.key")
    policies = root / "policies"
    policies.mkdir(exist_ok=True)
    if not (policies / "model.conf").exists():
        (policies / "model.conf").write_text(STARTER_MODEL.read_text())
    rules = policies / f"{org}.csv"
    if not rules.exists():
        rules.write_text(
            f"# Sharing policy of {org}. Nothing is invoked, sent or shared without a rule here.\n"
            "# See policies/README.md in the Fedgate repository for the rule format.\n"
        )
    load_or_create_pseudonym_key(root / "data" / "pseudonym.key")
    config_path.write_text(
        f"""# Fedgate gateway of {org}. Paths are relative to this file.
[gateway]
org = "{org}"
data_dir = "data"
default_deadline_seconds = 30
shutdown_grace_seconds = 10

[federation]
# mutual TLS: partners reach this address; they must present a certificate of the federation CA
listen = "{federation_listen}"
cert = "certs/{org}.crt"
key = "certs/{org}.key"
ca = "certs/ca.crt"

[participant]
# local agents and requesters (the SDK) connect here; keep it on loopback
listen = "{participant_listen}"

[policy]
model = "policies/model.conf"
rules = "policies/{org}.csv"

[audit]
# database_url = "postgresql+psycopg://fedgate@db.internal/fedgate"   (default: SQLite in data/)

# Partners: one table per organization, named as its certificate's O attribute.
# [peers.insurer]
# address = "insurer-gateway.example.org:7443"
"""
    )
    click.echo(f"created {config_path} for organization {org!r}")
    click.echo(f"development certificates in {certs} ({DEV_WARNING})")
    click.echo(
        f"next: add partners under [peers.NAME], write rules in {rules}, then `fedgate serve`"
    )
    click.echo(
        "agents and requesters need a token: `fedgate tokens issue --subject NAME --agent AGENT` "
        "or `--call ORG/AGENT.SKILL`"
    )


@click.command()
@config_option
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def serve(config_path: str, log_level: str) -> None:
    """Run this organization's gateway until SIGTERM (in-flight tasks get a grace period)."""
    from gateway.grpc_log import GrpcLogTap
    from gateway.server import serve as run

    config = read_config(config_path)
    # grpc's log (fd 2) is read by a thread; Python's own stderr goes straight to the terminal.
    tap = GrpcLogTap()
    tap.install()
    try:
        logging.basicConfig(
            level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # Casbin logs its model and rules at INFO on every (re)load: noise in a gateway's log.
        logging.getLogger("casbin").setLevel(max(logging.WARNING, logging.getLevelName(log_level)))
        if not tap.active:
            logging.getLogger("fedgate.tls").warning(
                "refused TLS handshakes are not logged: grpc was loaded before `fedgate serve` "
                "could turn on its handshake trace"
            )
        status = asyncio.run(run(config, handshakes=tap.handshakes))
    finally:
        tap.close()
    sys.exit(status)


@click.group()
def certs() -> None:
    """Development certificates: a federation CA and gateway certificates."""


@certs.command("ca")
@click.option("--out", default="certs", type=click.Path(file_okay=False), show_default=True)
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
def certs_ca(out: str, days: int) -> None:
    """Create a federation CA (ca.crt, ca.key)."""
    target = Path(out)
    if (target / "ca.key").exists():
        raise ConfigError(f"{target / 'ca.key'}: already exists: refusing to overwrite a CA key")
    write_pair(create_ca(days=days), target / "ca.crt", target / "ca.key")
    click.echo(f"wrote {target / 'ca.crt'} and {target / 'ca.key'}")


@certs.command("issue")
@click.option("--org", required=True, callback=_org_name)
@click.option("--ca-dir", default="certs", type=click.Path(file_okay=False), show_default=True)
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="Default: the CA folder."
)
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650))
def certs_issue(org: str, ca_dir: str, out: str | None, days: int) -> None:
    """Issue a gateway certificate for ORG, signed by the federation CA."""
    ca_path = Path(ca_dir)
    try:
        ca = IssuedCert((ca_path / "ca.crt").read_bytes(), (ca_path / "ca.key").read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{exc.filename}: not found: create a CA first with `fedgate certs ca`"
        ) from None
    target = Path(out or ca_dir)
    write_pair(issue_gateway_cert(ca, org, days=days), target / f"{org}.crt", target / f"{org}.key")
    click.echo(f"wrote {target / f'{org}.crt'} and {target / f'{org}.key'}")


@certs.command("revoke")
@click.option(
    "--cert",
    "cert_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The certificate to revoke.",
)
@click.option("--ca-dir", default="certs", type=click.Path(file_okay=False), show_default=True)
@click.option(
    "--crl",
    "crl_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The federation's revocation list (default: CA_DIR/federation.crl); extended.",
)
def certs_revoke(cert_path: str, ca_dir: str, crl_path: str | None) -> None:
    """Revoke a gateway certificate: add it to the federation's CRL (gateways re-read it)."""
    from gateway.identity.certs import load_cert, revocation_list, revoked_serials

    ca_path = Path(ca_dir)
    try:
        ca = IssuedCert((ca_path / "ca.crt").read_bytes(), (ca_path / "ca.key").read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc.filename}: not found: revoking needs the federation CA") from None
    target = Path(crl_path) if crl_path else ca_path / "federation.crl"
    serials = revoked_serials(target.read_bytes()) if target.exists() else []
    cert = load_cert(Path(cert_path).read_bytes())
    target.write_bytes(revocation_list(ca, [*serials, cert.serial_number]))
    click.echo(
        f"revoked serial {cert.serial_number:x}; {target} now lists {len(set(serials)) + 1} "
        "certificates: point [federation] crl at it on every gateway"
    )


@certs.command("dev")
@click.option("--out", default="certs_dev", type=click.Path(file_okay=False), show_default=True)
@click.option(
    "--org",
    "orgs",
    multiple=True,
    default=("hospital", "insurer"),
    callback=_org_name,
    show_default=True,
)
def certs_dev(out: str, orgs: tuple[str, ...]) -> None:
    """Write a complete, clearly marked INSECURE development set (CA and one cert per org)."""
    target = Path(out)
    ca = create_ca()
    write_pair(ca, target / "ca.crt", target / "ca.key")
    for org in orgs:
        write_pair(issue_gateway_cert(ca, org), target / f"{org}.crt", target / f"{org}.key")
    (target / "README.md").write_text(
        f"# {DEV_WARNING}\n\nMade by `fedgate certs dev` on {dt.date.today()}. "
        "These keys are public "
        "(committed to the repository): never use them outside a local demo or test.\n"
    )
    click.echo(f"wrote a development federation ({', '.join(orgs)}) to {target}")


def _ask_gateway(
    target: str, request: Callable[[Any, Any], Awaitable[Any]], token: str | None
) -> Any:
    """One call to a running gateway's participant listener, with a clear error if it is down.

    `request(stub, metadata)`; the metadata carries the operator token, if any.
    """
    from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def ask() -> Any:
        async with grpc.aio.insecure_channel(target) as channel:
            return await request(pb_grpc.ParticipantStub(channel), metadata)

    try:
        return asyncio.run(ask())
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise ConfigError(
                f"gateway at {target} refused: {exc.details()}; pass an operator token with "
                "--token or FEDGATE_TOKEN (`fedgate tokens issue --subject NAME --operator`)"
            ) from None
        raise ConfigError(
            f"gateway at {target} did not answer ({exc.code().name}): is `fedgate serve` running?"
        ) from None


def _token_option(func: Any) -> Any:
    return click.option(
        "--token",
        envvar="FEDGATE_TOKEN",
        default=None,
        help="An operator token (`fedgate tokens issue --operator`); default $FEDGATE_TOKEN.",
    )(func)


@click.command()
@config_option
@click.option("--address", default=None, help="Participant listener (default: from the config).")
@click.option("--json", "as_json", is_flag=True)
@_token_option
def agents(config_path: str, address: str | None, as_json: bool, token: str | None) -> None:
    """The agents connected to a running gateway."""
    import json

    from fedgate.v1 import fedgate_pb2 as pb

    target = address or read_config(config_path).participant.listen

    response: pb.ListConnectedAgentsResponse = _ask_gateway(
        target,
        lambda stub, metadata: stub.ListConnectedAgents(
            pb.ListAgentsRequest(), timeout=5, metadata=metadata
        ),
        token,
    )
    rows = [
        {
            "agent": a.card.name,
            "skills": [s.name for s in a.card.skills],
            "instances": a.instances,
            "tasks_in_flight": a.tasks_in_flight,
        }
        for a in response.agents
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"agents connected to {target}")
    for column in ("agent", "skills", "instances", "in flight"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["agent"],
            ", ".join(row["skills"]),
            str(row["instances"]),
            str(row["tasks_in_flight"]),
        )
    Console().print(table if rows else "no agents are connected")


@click.command()
@config_option
@click.option("--address", default=None, help="Participant listener (default: from the config).")
@click.option("--json", "as_json", is_flag=True)
@_token_option
def peers(config_path: str, address: str | None, as_json: bool, token: str | None) -> None:
    """Each partner's circuit state, latency and last error, as the running gateway sees them."""
    import json

    from fedgate.v1 import fedgate_pb2 as pb

    target = address or read_config(config_path).participant.listen

    response: pb.ListPeersResponse = _ask_gateway(
        target,
        lambda stub, metadata: stub.ListPeers(pb.ListPeersRequest(), timeout=5, metadata=metadata),
        token,
    )
    rows = [
        {
            "org": p.org,
            "address": p.address,
            "circuit": p.circuit,
            "latency_ms": round(p.latency_ms, 1),
            "in_flight": p.in_flight,
            "consecutive_failures": p.consecutive_failures,
            "last_error": p.last_error,
        }
        for p in response.peers
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"peers of the gateway at {target}")
    for column in ("peer", "address", "circuit", "latency", "in flight", "failures", "last error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = {"closed": "green", "open": "red"}.get(str(row["circuit"]), "yellow")
        table.add_row(
            str(row["org"]),
            str(row["address"]),
            f"[{style}]{row['circuit']}[/]",
            f"{row['latency_ms']} ms",
            str(row["in_flight"]),
            str(row["consecutive_failures"]),
            str(row["last_error"]) or "—",
        )
    Console().print(table if rows else "no peers are configured")


@click.command()
@click.option("--quiet", is_flag=True, help="Print only the summary.")
def demo(quiet: bool) -> None:
    """Three organizations, their agents and policies, cross-org exchanges, the audit trails."""
    from gateway.demo import run_demo

    sys.exit(asyncio.run(run_demo(quiet=quiet)))


COMMANDS: list[click.Command] = [init, serve, certs, agents, peers, demo]


@click.command("reload")
@config_option
def policy_reload(config_path: str) -> None:
    """Ask the running gateway to reload its policy (it also reloads on file change)."""
    import os
    import signal

    from gateway.policy.engine import load_or_create_pseudonym_key, load_policy

    config = read_config(config_path)
    if config.policy is None:
        raise ConfigError(f"{config.source}: [policy] is missing: there is no policy to reload")
    # Check first, so an invalid policy is reported here and not only in the gateway's log.
    policy = load_policy(
        config.policy.model,
        config.policy.rules,
        pseudonym_key=load_or_create_pseudonym_key(config.pseudonym_key_path),
    )
    from gateway.data_folder import running_gateway

    pid = running_gateway(config.data_dir)
    if pid is None:
        raise ConfigError(
            f"{config.data_dir}: no running gateway holds this data folder: start it with "
            "`fedgate serve`"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError(
            f"{config.data_dir}: the gateway (pid {pid}) has just stopped: start it with "
            "`fedgate serve`"
        ) from None
    click.echo(f"asked gateway (pid {pid}) to reload policy {policy.version}")
