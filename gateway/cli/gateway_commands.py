"""Operator commands: init, serve, certs, agents, demo."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway.cli._common import config_option, read_config
from gateway.config import ORG_NAME
from gateway.data_folder import ensure_private_folder
from gateway.errors import ConfigError
from gateway.identity.certs import (
    DEV_WARNING,
    IssuedCert,
    certificate_facts,
    certificate_request,
    create_ca,
    encrypt_key,
    is_development_ca,
    issue_from_request,
    issue_gateway_cert,
    load_ca,
    load_cert,
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


CA_PASSPHRASE_ENV = "FEDGATE_CA_PASSPHRASE"  # noqa: S105 (the variable's name)
MIN_PASSPHRASE = 12


def _ca_passphrase(*, new: bool = False) -> Callable[[], bytes]:
    """The federation CA key's passphrase, from $FEDGATE_CA_PASSPHRASE or asked (hidden)."""

    def ask() -> bytes:
        value = os.environ.get(CA_PASSPHRASE_ENV)
        if value is None:
            if not sys.stdin.isatty():
                raise ConfigError(
                    f"the federation CA key needs its passphrase: set {CA_PASSPHRASE_ENV}, or run "
                    "this in a terminal to be asked"
                )
            value = click.prompt(
                "passphrase of the federation CA key", hide_input=True, confirmation_prompt=new
            )
        if new and len(value) < MIN_PASSPHRASE:
            raise ConfigError(
                f"the CA key's passphrase must have at least {MIN_PASSPHRASE} characters"
            )
        return value.encode()

    return ask


def _read_ca_certificate(path: Path) -> bytes:
    """The PEM of a CA certificate file, or ConfigError saying what the file is instead."""
    try:
        pem = path.read_bytes()
        cert = load_cert(pem)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None
    if not certificate_facts(cert.public_bytes(serialization.Encoding.DER)).is_ca:
        raise ConfigError(
            f"{path}: not a CA certificate (no basicConstraints CA): give the federation CA's "
            "certificate (ca.crt from `fedgate certs ca`), not a gateway's"
        )
    return pem


def _set_aside(path: Path, note: list[str]) -> None:
    """Rename a development file out of the way (certs/ca.crt -> certs/dev-ca.crt)."""
    if path.exists():
        aside = path.with_name(f"dev-{path.name}")
        path.replace(aside)
        note.append(f"{path.name} -> {aside.name}")


def _federation_certs(certs: Path, org: str, ca_cert: Path) -> list[str]:
    """init --ca-cert: the federation CA in certs/ca.crt, a key and a request for it to sign."""
    ca_pem = _read_ca_certificate(ca_cert)
    set_aside: list[str] = []
    existing = certs / "ca.crt"
    if existing.exists() and existing.read_bytes() != ca_pem:
        if not is_development_ca(existing.read_bytes()):
            raise ConfigError(
                f"{existing}: holds another CA than {ca_cert}: move it away first, if the "
                "federation's CA has changed"
            )
        # A trial's development CA, from an earlier `fedgate init`: no longer trusted, nor is
        # the gateway certificate it issued.
        for name in ("ca.crt", "ca.key", f"{org}.crt", f"{org}.key"):
            _set_aside(certs / name, set_aside)
    certs.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(ca_pem)
    own = certs / f"{org}.crt"
    if own.exists():
        return set_aside  # already issued by the federation CA (serve checks that it chains)
    if not (certs / f"{org}.key").exists():
        request = certificate_request(org)
        write_pair(request, certs / f"{org}.csr", certs / f"{org}.key")
    return set_aside


def _check_default_cert_paths(config_path: Path, org: str) -> None:
    """A fedgate.toml that `init --ca-cert` may keep: [federation] names init's own files."""
    import tomllib

    try:
        federation = tomllib.loads(config_path.read_text()).get("federation", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot be read ({exc}): pass --force") from None
    expected = {"cert": f"certs/{org}.crt", "key": f"certs/{org}.key", "ca": "certs/ca.crt"}
    if any(federation.get(key) != value for key, value in expected.items()):
        raise ConfigError(
            f"{config_path}: [federation] names other files than `fedgate init` writes: put the "
            "federation CA's certificate at its ca yourself, make a key and request with `fedgate "
            f"certs request --org {org}`, or pass --force to write a new fedgate.toml"
        )


def _joined(certs: Path, org: str, ca_cert: Path, set_aside: list[str]) -> None:
    """What `init --ca-cert` did, and what to do next."""
    if set_aside:
        click.echo(f"the trial's development certificates set aside: {', '.join(set_aside)}")
    click.echo(f"trusts the federation CA of {ca_cert} (copied to {certs / 'ca.crt'})")
    if (certs / f"{org}.csr").exists() and not (certs / f"{org}.crt").exists():
        click.echo(
            f"send {certs / f'{org}.csr'} to the federation CA's operator, who runs `fedgate "
            f"certs issue --org {org} --csr {org}.csr` and sends back {org}.crt: put it at "
            f"{certs / f'{org}.crt'} (the key {certs / f'{org}.key'} never leaves this host)"
        )


@click.command()
@click.option(
    "--org", required=True, callback=_org_name, help="Your organization's name, e.g. hospital."
)
@click.option(
    "--dir", "directory", default=".", type=click.Path(file_okay=False), show_default=True
)
@click.option("--federation-listen", default="127.0.0.1:7443", show_default=True)
@click.option("--participant-listen", default="127.0.0.1:7400", show_default=True)
@click.option(
    "--ca-cert",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="The federation CA's certificate: joins that federation (a key and a certificate "
    "request for its CA) instead of making a development CA for a trial.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing fedgate.toml.")
def init(
    org: str,
    directory: str,
    federation_listen: str,
    participant_listen: str,
    ca_cert: str | None,
    force: bool,
) -> None:
    """Create a starter fedgate.toml, data folder, deny-all policy and certificates.

    Without --ca-cert, a development CA and this gateway's certificate, for a trial. With it,
    the federation's CA certificate and a key and request (certs/ORG.csr) for that CA to sign.
    """
    from gateway.policy.engine import load_or_create_pseudonym_key

    root = Path(directory)
    config_path = root / "fedgate.toml"
    # An existing gateway (a trial) that joins a federation keeps its fedgate.toml.
    joining = config_path.exists() and not force and ca_cert is not None
    if config_path.exists() and not force and not joining:
        raise ConfigError(f"{config_path}: already exists: pass --force to overwrite it")
    if joining:
        _check_default_cert_paths(config_path, org)
    root.mkdir(parents=True, exist_ok=True)
    ensure_private_folder(root / "data")
    certs = root / "certs"
    set_aside: list[str] = []
    if ca_cert is not None:
        set_aside = _federation_certs(certs, org, Path(ca_cert))
    else:
        if not (certs / "ca.crt").exists():
            write_pair(create_ca(), certs / "ca.crt", certs / "ca.key")
        if not (certs / f"{org}.crt").exists():
            ca = load_ca(certs / "ca.crt", certs / "ca.key", _ca_passphrase())
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
    if joining:
        click.echo(f"kept {config_path}")
        _joined(certs, org, Path(ca_cert or ""), set_aside)
        return
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
# the federation CA: the one CA whose certificates this gateway accepts, and that issued cert
ca = "certs/ca.crt"

[participant]
# local agents and requesters (the SDK) connect here; keep it on loopback, or give it TLS
# (cert and key) to listen on another address
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
    if ca_cert is None:
        click.echo(f"development certificates in {certs} ({DEV_WARNING})")
        click.echo(
            f"to join a real federation later: `fedgate init --org {org} --ca-cert "
            "FEDERATION-CA.crt` (keeps this fedgate.toml and your policies)"
        )
    else:
        _joined(certs, org, Path(ca_cert), set_aside)
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
    """Certificates: a federation CA, gateway keys and requests, certificates, revocation."""


@certs.command("ca")
@click.option("--out", default="certs", type=click.Path(file_okay=False), show_default=True)
@click.option(
    "--name",
    default="Fedgate federation CA",
    show_default=True,
    help="The CA's name (subject CN), e.g. 'Northwind Health Federation CA'.",
)
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
def certs_ca(out: str, name: str, days: int) -> None:
    """Create a federation CA: ca.crt for every gateway, ca.key encrypted with a passphrase.

    The passphrase comes from $FEDGATE_CA_PASSPHRASE or is asked for. The CA issues only
    gateway certificates (pathLenConstraint 0). Run it once per federation, on the CA
    operator's machine, and keep ca.key and its passphrase offline.
    """
    target = Path(out)
    if (target / "ca.key").exists():
        raise ConfigError(f"{target / 'ca.key'}: already exists: refusing to overwrite a CA key")
    if not 1 <= len(name) <= 64:
        raise ConfigError(f"--name: 1 to 64 characters, got {len(name)}")
    passphrase = _ca_passphrase(new=True)()
    ca = create_ca(name, days=days, development=False)
    write_pair(
        IssuedCert(ca.cert_pem, encrypt_key(ca.key_pem, passphrase)),
        target / "ca.crt",
        target / "ca.key",
    )
    expires = load_cert(ca.cert_pem).not_valid_after_utc
    click.echo(
        f"wrote {target / 'ca.crt'} (give it to every gateway of the federation: [federation] ca, "
        f"or `fedgate init --ca-cert`), valid until {expires:%Y-%m-%d}, and {target / 'ca.key'} "
        "(encrypted: keep it and its passphrase offline)"
    )


@certs.command("request")
@click.option("--org", required=True, callback=_org_name)
@click.option("--out", default="certs", type=click.Path(file_okay=False), show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing key (and its certificate).")
def certs_request(org: str, out: str, force: bool) -> None:
    """Make this gateway's key (ORG.key, stays here) and a request (ORG.csr) for the CA."""
    target = Path(out)
    key = target / f"{org}.key"
    if key.exists() and not force:
        raise ConfigError(
            f"{key}: already exists: pass --force to replace it (its certificate stops working)"
        )
    write_pair(certificate_request(org), target / f"{org}.csr", key)
    click.echo(
        f"wrote {key} (keep it here) and {target / f'{org}.csr'}: send the request to the "
        f"federation CA's operator, who runs `fedgate certs issue --org {org} --csr {org}.csr`, "
        f"and put the certificate you get back at {target / f'{org}.crt'}"
    )


@certs.command("issue")
@click.option("--org", required=True, callback=_org_name)
@click.option(
    "--csr",
    "csr_path",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="The gateway's request (from `fedgate certs request`): only ORG.crt is written.",
)
@click.option("--ca-dir", default="certs", type=click.Path(file_okay=False), show_default=True)
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="Default: the CA folder."
)
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650))
@click.option(
    "--san",
    "names",
    multiple=True,
    help="A further DNS name or IP address the gateway's listeners are reached by (repeatable).",
)
def certs_issue(
    org: str,
    csr_path: str | None,
    ca_dir: str,
    out: str | None,
    days: int,
    names: tuple[str, ...],
) -> None:
    """Issue a gateway certificate for ORG, signed by the federation CA.

    With --csr, for the key of that request (the usual way: the key stays with the gateway).
    Without, a new key as well (a development set, or one operator for every gateway).
    """
    ca_path = Path(ca_dir)
    ca = load_ca(ca_path / "ca.crt", ca_path / "ca.key", _ca_passphrase())
    target = Path(out or ca_dir)
    cert = target / f"{org}.crt"
    if csr_path is not None:
        try:
            request = Path(csr_path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{csr_path}: cannot read: {exc.strerror}") from None
        try:
            pem = issue_from_request(ca, request, org, days=days, names=names)
        except ConfigError as exc:
            raise ConfigError(f"{csr_path}: {exc.message}") from None
        target.mkdir(parents=True, exist_ok=True)
        cert.write_bytes(pem)
        click.echo(f"wrote {cert}: send it back to {org}, to put beside its key")
        return
    # A development set also names localhost and 127.0.0.1; a federation CA names what it is
    # asked to name, and no more.
    issued = (
        issue_gateway_cert(ca, org, days=days, extra_dns=("localhost", *names))
        if is_development_ca(ca.cert_pem)
        else issue_gateway_cert(ca, org, days=days, names=names)
    )
    write_pair(issued, cert, target / f"{org}.key")
    click.echo(f"wrote {cert} and {target / f'{org}.key'}")


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
    from gateway.identity.certs import revocation_list, revoked_serials

    ca_path = Path(ca_dir)
    ca = load_ca(
        ca_path / "ca.crt",
        ca_path / "ca.key",
        _ca_passphrase(),
        missing="revoking needs the federation CA",
    )
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
        f"# {DEV_WARNING}\n\nMade by `fedgate certs dev` on {dt.date.today()}. The CA key is "
        "unencrypted and every certificate names localhost: never use them outside a local "
        "demo or test, and never commit them. A real federation's CA: `fedgate certs ca`.\n"
    )
    click.echo(f"wrote a development federation ({', '.join(orgs)}) to {target}")


@dataclass(frozen=True)
class _Listener:
    """How to reach a gateway's participant listener: its address and, with TLS, the CA that
    issued its certificate and a name that certificate carries."""

    address: str
    ca_pem: bytes | None = None
    server_name: str | None = None


def _ask_gateway(
    listener: _Listener, request: Callable[[Any, Any], Awaitable[Any]], token: str | None
) -> Any:
    """One call to a running gateway's participant listener, with a clear error if it is down.

    `request(stub, metadata)`; the metadata carries the operator token, if any.
    """
    from fedgate.v1 import fedgate_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def ask() -> Any:
        if listener.ca_pem is None:
            channel = grpc.aio.insecure_channel(listener.address)
        else:
            options = []
            if listener.server_name:
                options.append(("grpc.ssl_target_name_override", listener.server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=listener.ca_pem)
            channel = grpc.aio.secure_channel(listener.address, credentials, options)
        async with channel:
            return await request(pb_grpc.ParticipantStub(channel), metadata)

    try:
        return asyncio.run(ask())
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise ConfigError(
                f"gateway at {listener.address} refused: {exc.details()}; pass an operator token "
                "with --token or FEDGATE_TOKEN (`fedgate tokens issue --subject NAME --operator`)"
            ) from None
        raise ConfigError(
            f"gateway at {listener.address} did not answer ({exc.code().name}): is `fedgate "
            "serve` running?"
        ) from None


def _token_option(func: Any) -> Any:
    return click.option(
        "--token",
        envvar="FEDGATE_TOKEN",
        default=None,
        help="An operator token (`fedgate tokens issue --operator`); default $FEDGATE_TOKEN.",
    )(func)


def _participant_listener(config_path: str, address: str | None) -> _Listener:
    """The participant listener to ask: from --address alone when there is no config file,
    else from the config (with TLS when it has a certificate)."""
    if address is not None and not Path(config_path).exists():
        return _Listener(address)
    config = read_config(config_path)
    listen = config.participant.listen
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):  # noqa: S104 (an address to dial, not to bind)
        listen = f"127.0.0.1:{port}"
    target = address or listen
    ca, cert = config.participant_ca, config.participant.cert
    if ca is None or cert is None:
        return _Listener(target)
    # Dialed as a name its certificate carries, whatever address reaches it from here.
    try:
        san = load_cert(cert.read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        names = san.value.get_values_for_type(x509.DNSName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        names = []
    return _Listener(target, ca.read_bytes(), names[0] if names else None)


@click.command()
@config_option
@click.option("--address", default=None, help="Participant listener (default: from the config).")
@click.option("--json", "as_json", is_flag=True)
@_token_option
def agents(config_path: str, address: str | None, as_json: bool, token: str | None) -> None:
    """The agents connected to a running gateway."""
    import json

    from fedgate.v1 import fedgate_pb2 as pb

    listener = _participant_listener(config_path, address)
    target = listener.address

    response: pb.ListConnectedAgentsResponse = _ask_gateway(
        listener,
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

    listener = _participant_listener(config_path, address)
    target = listener.address

    response: pb.ListPeersResponse = _ask_gateway(
        listener,
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
    render_peers(rows, target, Console())


def render_peers(rows: list[dict[str, Any]], target: str, console: Console) -> None:
    """The peers table: short columns that fit 80 columns, each last error on its own line(s)
    below (an error is long free text; in a column it made the table unreadable)."""
    if not rows:
        console.print("no peers are configured")
        return
    # One space between columns and no edges: an address of 34 characters still fits in 80.
    table = Table(
        title=f"peers of the gateway at {target}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
    )
    table.add_column("peer", no_wrap=True)
    table.add_column("address", overflow="fold")
    table.add_column("circuit", no_wrap=True)
    for column in ("latency", "in flight", "failures"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        style = {"closed": "green", "open": "red"}.get(str(row["circuit"]), "yellow")
        latency = row["latency_ms"]
        table.add_row(
            Text(str(row["org"])),
            Text(str(row["address"])),
            Text(str(row["circuit"]), style=style),
            f"{latency} ms" if latency else "—",
            str(row["in_flight"]),
            str(row["consecutive_failures"]),
        )
    console.print(table)
    for row in rows:
        if row["last_error"]:
            line = Text(f"{row['org']}: ", style="bold")
            line.append(f"last error: {row['last_error']}")  # a Text: no markup read from it
            console.print(line)


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
