"""The gateway's configuration: one TOML file, validated once into frozen, typed objects.

Relative paths are resolved against the folder of the config file. Any key can be overridden
from the environment as FEDGATE_<SECTION>_<KEY> (for example FEDGATE_AUDIT_DATABASE_URL).
A bad value fails at start with one line naming the file, the key and what is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError

ORG_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
AGENT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})$")
ENV_PREFIX = "FEDGATE_"


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GatewaySection(_Section):
    org: str
    data_dir: Path = Path("data")
    default_deadline_seconds: float = Field(30.0, gt=0, le=86_400)
    max_deadline_seconds: float = Field(600.0, gt=0, le=86_400)
    shutdown_grace_seconds: float = Field(10.0, ge=0, le=3_600)
    # How long the task table keeps a finished task (its result, for retries and `get`): a key
    # older than this runs again. 0 keeps them all. Running tasks are never pruned.
    task_retention_days: float = Field(30.0, ge=0, le=36_500)

    @field_validator("org")
    @classmethod
    def _org(cls, value: str) -> str:
        if not ORG_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid organization name (lowercase letters, digits and "
                "hyphens, at most 63 characters)"
            )
        return value


class FederationSection(_Section):
    listen: str = "127.0.0.1:7443"
    cert: Path
    key: Path
    ca: Path
    # Certificate revocation list (PEM) of the federation, checked on every new peer connection.
    crl: Path | None = None
    # Lifetime of the signed delegation statement sent with each task, and the longest accepted.
    delegation_ttl_seconds: float = Field(300.0, gt=0, le=3600)
    delegation_max_ttl_seconds: float = Field(900.0, gt=0, le=86_400)

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT is reachable from this host only (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ParticipantSection(_Section):
    listen: str = "127.0.0.1:7400"
    # Agents and requesters must present a token issued by `fedgate tokens issue`.
    require_tokens: bool = True
    # A Connect stream whose first message (RegisterAgents) takes longer than this is closed.
    connect_timeout_seconds: float = Field(10.0, gt=0, le=3_600)
    # TLS on the participant listener (its certificate and key), required off loopback; the
    # SDK then connects with `tls_ca`. `ca`: the CA that issued `cert`, which `fedgate agents`
    # and `fedgate peers` trust (default: [federation] ca).
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> ParticipantSection:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key: give both (TLS on the participant listener) or neither")
        if is_loopback(self.listen):
            return self
        if self.cert is None:
            raise ValueError(
                f"listen = {self.listen!r} is reachable from other hosts, but the participant "
                "listener has no TLS (tokens and payloads would cross the network in "
                "plaintext): set [participant] cert and key (`fedgate certs issue --san HOST`), "
                "or listen on 127.0.0.1"
            )
        if not self.require_tokens:
            raise ValueError(
                f"listen = {self.listen!r} is reachable from other hosts, so require_tokens = "
                "false would let anyone there call through this gateway: keep require_tokens = "
                "true, or listen on 127.0.0.1"
            )
        return self


class PeerSection(_Section):
    address: str

    _address = field_validator("address")(classmethod(lambda cls, v: _check_address(v)))


class PolicySection(_Section):
    model: Path
    rules: Path
    # Folder of policy test cases for `fedgate policy test`.
    tests: Path | None = None
    # HMAC key for pseudonymization; created by `fedgate init`. Defaults to DATA_DIR/pseudonym.key.
    pseudonym_key: Path | None = None
    # Reload automatically when a policy file changes.
    watch: bool = True


class AuditSection(_Section):
    # SQLAlchemy URL; defaults to SQLite in WAL mode at DATA_DIR/audit.db.
    database_url: str | None = None
    # Keep full payloads of our own side in the audit log (off: paths and digests only).
    store_payloads: bool = False
    # Records older than this many days may be pruned by `fedgate audit prune`; 0 keeps all.
    retention_days: float = Field(0, ge=0)
    # How often to sign our chain head and exchange it with every peer; 0 turns it off.
    checkpoint_interval_seconds: float = Field(300.0, ge=0)


class LimitsSection(_Section):
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_payload_depth: int = Field(32, ge=1, le=1_000)
    max_payload_fields: int = Field(10_000, ge=1, le=1_000_000)
    # Per-peer limits on the federation listener.
    peer_rate_per_second: float = Field(200.0, gt=0)
    peer_burst: int = Field(400, ge=1)
    peer_max_concurrent_tasks: int = Field(256, ge=1)


class A2AAgentSection(_Section):
    """An A2A server offered as one of our local agents (A2A out): gateway/edges/a2a/outbound.py."""

    # The agent's name in policies, tokens and cards.
    name: str
    # Where its A2A agent card is, e.g. http://127.0.0.1:9999/.well-known/agent-card.json.
    card_url: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not AGENT_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid agent name (letters, digits, '-', '_')")
        return value

    @field_validator("card_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value


class A2ASection(_Section):
    """A2A 1.0 at the gateway's edges (docs/a2a.md): a listener for our own A2A clients, and A2A
    servers offered as local agents."""

    # HTTP: agent cards, JSON-RPC and HTTP+JSON; "" turns it off. Keep it on loopback.
    listen: str = "127.0.0.1:7480"
    # gRPC (lf.a2a.v1.A2AService); "" turns it off.
    grpc_listen: str = "127.0.0.1:7481"
    # The base URL and gRPC address put in cards (default: the bound listen addresses).
    public_url: str | None = None
    grpc_public_address: str | None = None
    # TLS on both listeners (PEM files); both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The agent ("org/agent") a gRPC call without a tenant is for.
    grpc_default_agent: str | None = None
    # The largest file part (decoded bytes) a message or an agent's result may carry.
    max_file_bytes: int = Field(1024 * 1024, ge=1, le=256 * 1024 * 1024)
    # How often partners' agent lists and A2A agents' cards are read again.
    card_refresh_seconds: float = Field(30.0, gt=0, le=86_400)
    # Finished A2A tasks kept for GetTask and ListTasks (the task table keeps them all).
    max_tasks_kept: int = Field(10_000, ge=1, le=10_000_000)
    agents: list[A2AAgentSection] = Field(default_factory=list)

    @field_validator("listen", "grpc_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return value if value == "" else _check_address(value)

    @field_validator("grpc_default_agent")
    @classmethod
    def _default_agent(cls, value: str | None) -> str | None:
        if value is None:
            return None
        org, slash, agent = value.partition("/")
        if not slash or not ORG_NAME.match(org) or not AGENT_NAME.match(agent):
            raise ValueError(f"expected ORG/AGENT, got {value!r}")
        return value

    @field_validator("agents")
    @classmethod
    def _unique(cls, value: list[A2AAgentSection]) -> list[A2AAgentSection]:
        names = [a.name for a in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"agent {name!r} is configured twice")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> A2ASection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        for key, address in (("listen", self.listen), ("grpc_listen", self.grpc_listen)):
            if address and not is_loopback(address) and self.tls_cert is None:
                raise ValueError(
                    f"{key} = {address!r} is reachable from other hosts, but the A2A listeners "
                    "have no TLS (tokens and payloads would cross the network in plaintext): "
                    "set [a2a] tls_cert and tls_key, or listen on 127.0.0.1"
                )
        return self

    def off_loopback(self) -> bool:
        return any(a and not is_loopback(a) for a in (self.listen, self.grpc_listen))


class GatewayConfig(_Section):
    """A validated gateway configuration; every path is absolute."""

    source: Path = Path("fedgate.toml")
    gateway: GatewaySection
    federation: FederationSection
    participant: ParticipantSection = ParticipantSection()
    peers: dict[str, PeerSection] = Field(default_factory=dict)
    policy: PolicySection | None = None
    audit: AuditSection = AuditSection()
    limits: LimitsSection = LimitsSection()
    a2a: A2ASection | None = None

    @model_validator(mode="after")
    def _a2a_tokens_off_loopback(self) -> GatewayConfig:
        if self.a2a is not None and self.a2a.off_loopback() and not self.participant.require_tokens:
            raise ValueError(
                "the A2A listeners are reachable from other hosts, so [participant] "
                "require_tokens = false would let anyone there call through this gateway: keep "
                "require_tokens = true, or listen on 127.0.0.1"
            )
        return self

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, value: dict[str, PeerSection]) -> dict[str, PeerSection]:
        for name in value:
            if not ORG_NAME.match(name):
                raise ValueError(f"peer name {name!r} is not a valid organization name")
        return value

    @property
    def org(self) -> str:
        return self.gateway.org

    @property
    def data_dir(self) -> Path:
        return self.gateway.data_dir

    @property
    def audit_database_url(self) -> str:
        if self.audit.database_url:
            return self.audit.database_url
        return f"sqlite:///{self.data_dir / 'audit.db'}"

    @property
    def participant_ca(self) -> Path | None:
        """The CA that `fedgate agents`/`peers` trust for a participant listener with TLS."""
        if self.participant.cert is None:
            return None
        return self.participant.ca or self.federation.ca

    @property
    def pseudonym_key_path(self) -> Path:
        if self.policy is not None and self.policy.pseudonym_key is not None:
            return self.policy.pseudonym_key
        return self.data_dir / "pseudonym.key"


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Apply FEDGATE_<SECTION>_<KEY> overrides onto the parsed TOML (values parsed as TOML)."""
    sections = {"gateway", "federation", "participant", "policy", "audit", "limits", "a2a"}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "FEDGATE_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            continue
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw.setdefault(section, {})[key] = value
    return raw


_PATH_KEYS = {
    "gateway": ("data_dir",),
    "federation": ("cert", "key", "ca", "crl"),
    "participant": ("cert", "key", "ca"),
    "policy": ("model", "rules", "tests", "pseudonym_key"),
    "a2a": ("tls_cert", "tls_key"),
}
_MUST_EXIST = {
    ("federation", "cert"),
    ("federation", "key"),
    ("federation", "ca"),
    ("federation", "crl"),
    ("participant", "cert"),
    ("participant", "key"),
    ("participant", "ca"),
    ("policy", "model"),
    ("policy", "rules"),
    ("a2a", "tls_cert"),
    ("a2a", "tls_key"),
}


def load_config(
    path: str | os.PathLike[str], environ: dict[str, str] | None = None
) -> GatewayConfig:
    """Read, override from the environment, validate and resolve a config file."""
    source = Path(path).resolve()
    label = str(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{label}: file not found: create one with `fedgate init` or pass --config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    raw = _apply_env(raw, dict(os.environ if environ is None else environ))
    base = source.parent
    if isinstance(raw.get("gateway"), dict):
        raw["gateway"].setdefault("data_dir", "data")
    for section, keys in _PATH_KEYS.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str):
                table[key] = str((base / value).resolve())
    raw["source"] = str(source)
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling)"
        raise ConfigError(f"{label}: {where}: {message}") from None
    _check_files(config, label)
    return config


def _check_files(config: GatewayConfig, label: str) -> None:
    for section, key in sorted(_MUST_EXIST):
        table = getattr(config, section)
        value = getattr(table, key, None) if table is not None else None
        if value is not None and not Path(value).is_file():
            request = Path(value).with_suffix(".csr")
            if (section, key) == ("federation", "cert") and request.is_file():
                raise ConfigError(
                    f"{label}: {section}.{key}: file not found: {value}: the federation CA has "
                    f"not issued it yet: send {request} to its operator (`fedgate certs issue "
                    f"--org {config.org} --csr {request.name}`) and put the certificate there"
                )
            raise ConfigError(f"{label}: {section}.{key}: file not found: {value}")
