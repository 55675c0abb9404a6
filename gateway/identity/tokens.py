"""Participant tokens: which local agents an SDK process may register, which skills it may call,
and whether it may read the gateway's operator views (`fedgate agents`, `fedgate peers`).

The gateway issues ES256 JWTs signed with its own token key (DATA_DIR/token.key, P-256, created
0600 when missing; deliberately not the TLS key, so that rotating one never touches the other).

    header   {"alg": "ES256", "typ": "fedgate-participant+jwt", "kid": <key id>}
    payload  {"iss": "fedgate:<org>", "aud": "fedgate:<org>:participant", "sub": <subject>,
              "jti": <token id>, "iat": ..., "exp": ...,
              "agents": [<agent name> | "*", ...], "calls": [<call pattern>, ...],
              "operator": true  (only on operator tokens)}

Call patterns (checked when issued, stored in their full form):

    pattern  := "*"                        any skill of any agent of any organization
              | ORG "/" AGENT              every skill of AGENT      ("insurer/claims")
              | ORG "/" AGENT "." SKILL    one skill                 ("insurer/claims.check")
    ORG      := an organization name | "*"
    AGENT    := an agent name | "*"
    SKILL    := a skill name | "*"

A "*" stands for a whole name, never part of one ("claims-*" is refused), so "insurer/*" means
every agent of insurer, "*/claims.check" that skill at any organization (this one included:
calls to local agents are checked the same way). "*" alone is "*/*.*".

An operator token (`fedgate tokens issue --operator`) may read what the participant listener
tells about the gateway itself: the connected agents with their cards, schemas and load, and the
peers with their addresses and last errors. Nothing else grants that, not even "*".

Only verified tokens are trusted: ES256 alone (so neither "none" nor an HMAC keyed with the public
key passes), this gateway's issuer and audience, not expired, not revoked. Revocations live in a
small JSON file that `verify` re-reads as soon as its modification changes, so `fedgate tokens
revoke` takes effect at once on a running gateway. A ledger of issued tokens (never the token
strings) sits next to it, for `fedgate tokens list`.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.data_folder import private_secret
from gateway.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

ALGORITHM = "ES256"
TOKEN_TYPE = "fedgate-participant+jwt"  # noqa: S105 (a JWT "typ", not a secret)
DEFAULT_TTL_SECONDS = 30 * 86_400.0
MAX_TTL_SECONDS = 366 * 86_400.0
MAX_TOKEN_BYTES = 8 * 1024
KEY_FILE = "token.key"
REVOCATIONS_FILE = "token-revocations.json"
LEDGER_FILE = "tokens.json"
# Revocations of tokens expired this long ago are dropped on the next write: they fail anyway.
_KEEP_EXPIRED_REVOCATIONS_SECONDS = 86_400.0
_MAX_VERIFIED_TOKENS = 4096

_ORG = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}"
_AGENT_GRANT = re.compile(rf"^(?:\*|{_NAME})$")
_CALL_PATTERN = re.compile(
    rf"^(?P<org>\*|{_ORG})/(?P<agent>\*|{_NAME})(?:\.(?P<skill>\*|{_NAME}))?$"
)
_SUBJECT = re.compile(r"^[A-Za-z0-9@._:+-][A-Za-z0-9@._:+ -]{0,127}$")
_TOKEN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def issuer_of(org: str) -> str:
    """The `iss` of tokens issued by the gateway of `org`."""
    return f"fedgate:{org}"


def audience_of(org: str) -> str:
    """The `aud` of tokens accepted by the participant listener of `org`."""
    return f"fedgate:{org}:participant"


def normalize_call_pattern(pattern: str) -> str:
    """The full ORG/AGENT.SKILL form of a call pattern; InvalidArgument names a bad one."""
    if pattern == "*":
        return "*/*.*"
    match = _CALL_PATTERN.match(pattern)
    if match is None:
        raise InvalidArgument(
            f"call pattern {pattern!r} is malformed: use ORG/AGENT.SKILL, ORG/AGENT or '*', "
            "where each part is a name or '*' (e.g. insurer/claims.check, insurer/*)"
        )
    return f"{match['org']}/{match['agent']}.{match['skill'] or '*'}"


def call_allowed(patterns: Iterable[str], target_org: str, agent: str, skill: str) -> bool:
    """Whether any pattern (in full form) grants target_org/agent.skill."""
    for pattern in patterns:
        org_part, _, rest = pattern.partition("/")
        agent_part, _, skill_part = rest.partition(".")
        if (
            org_part in ("*", target_org)
            and agent_part in ("*", agent)
            and skill_part in ("*", skill)
        ):
            return True
    return False


@dataclass(frozen=True)
class TokenClaims:
    """What a verified participant token grants."""

    token_id: str
    subject: str
    agents: tuple[str, ...]
    calls: tuple[str, ...]
    expires_at: float
    operator: bool = False


@dataclass(frozen=True)
class TokenRecord:
    """One issued token in the ledger (never the token itself)."""

    token_id: str
    subject: str
    agents: tuple[str, ...]
    calls: tuple[str, ...]
    issued_at: float
    expires_at: float
    revoked_at: float | None = None
    operator: bool = False

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "subject": self.subject,
            "agents": list(self.agents),
            "calls": list(self.calls),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "operator": self.operator,
        }

    @classmethod
    def from_json(cls, data: Any) -> TokenRecord:
        if not isinstance(data, dict):
            raise ValueError("a ledger entry is not an object")
        revoked_at = data.get("revoked_at")
        return cls(
            token_id=str(data["token_id"]),
            subject=str(data["subject"]),
            agents=tuple(str(a) for a in data["agents"]),
            calls=tuple(str(c) for c in data["calls"]),
            issued_at=float(data["issued_at"]),
            expires_at=float(data["expires_at"]),
            revoked_at=None if revoked_at is None else float(revoked_at),
            operator=data.get("operator", False) is True,
        )


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the token key, creating a fresh P-256 key (mode 0600) if the file does not exist."""

    def fresh() -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem = private_secret(path, fresh, "token key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            f"{path}: the token key must be ECDSA P-256: delete it and the gateway creates one "
            "(every token issued with the old key stops working)"
        )
    return key


def _read_json(path: Path, what: str) -> Any:
    """The JSON in `path`, or None when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: the {what} is not valid JSON ({exc.msg}, line {exc.lineno}): restore it "
            "from a backup"
        ) from None


def _write_json(path: Path, value: Any) -> None:
    """Replace `path` atomically: readers see the old file or the new one, never a part."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)  # the data folder is private, and so is what is in it
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _describe(claims: TokenClaims) -> str:
    return f"token {claims.token_id!r} ({claims.subject})"


class TokenAuthority:
    """Issues, verifies, lists and revokes the participant tokens of one gateway."""

    def __init__(
        self,
        org: str,
        key_path: Path,
        revocations_path: Path,
        *,
        ledger_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.org = org
        self.issuer = issuer_of(org)
        self.audience = audience_of(org)
        self.key_path = Path(key_path)
        self.revocations_path = Path(revocations_path)
        self.ledger_path = (
            Path(ledger_path) if ledger_path else self.revocations_path.with_name(LEDGER_FILE)
        )
        self._lock_path = self.revocations_path.with_name(".tokens.lock")
        self._clock = clock
        self._key = _load_or_create_key(self.key_path)
        self._public_key = self._key.public_key()
        self.key_id = _key_id(self._public_key)
        # Revoked token ids, and the file state they were read from (None: not read yet).
        self._revoked: dict[str, float] = {}
        self._revocations_state: tuple[int, int, int, int] | None = None
        self._read_lock = threading.Lock()
        # Tokens whose signature and claims passed, by their exact text (a bounded memo).
        self._verified: dict[str, TokenClaims] = {}

    # -- issuing -------------------------------------------------------------------------------

    def issue(
        self,
        subject: str,
        *,
        agents: Iterable[str] = (),
        calls: Iterable[str] = (),
        operator: bool = False,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
    ) -> str:
        """A signed token for `subject`, recorded in the ledger."""
        if not isinstance(subject, str) or not _SUBJECT.match(subject):
            raise InvalidArgument(
                f"subject {subject!r} is not valid: 1-128 letters, digits, spaces and "
                "'@._:+-', not starting with a space"
            )
        agent_grants = tuple(dict.fromkeys(agents))
        for agent in agent_grants:
            if not _AGENT_GRANT.match(agent):
                raise InvalidArgument(
                    f"agent {agent!r} is not a valid agent name (letters, digits, '-' and '_') "
                    "or '*'"
                )
        call_grants = tuple(dict.fromkeys(normalize_call_pattern(c) for c in calls))
        if not agent_grants and not call_grants and not operator:
            raise InvalidArgument(
                f"a token for {subject!r} would grant nothing: pass --agent NAME to let it "
                "register an agent, --call ORG/AGENT.SKILL to let it call one, and/or "
                "--operator to let it read `fedgate agents` and `fedgate peers`"
            )
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidArgument(
                f"token lifetime of {ttl_seconds / 86_400:g} days is out of range: more than 0 "
                f"and at most {MAX_TTL_SECONDS / 86_400:g} days"
            )
        now = self._clock()
        record = TokenRecord(
            token_id=uuid.uuid4().hex,
            subject=subject,
            agents=agent_grants,
            calls=call_grants,
            issued_at=now,
            expires_at=float(int(now + ttl_seconds)),
            operator=operator,
        )
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "jti": record.token_id,
            "iat": int(now),
            "exp": int(record.expires_at),
            "agents": list(agent_grants),
            "calls": list(call_grants),
        }
        if operator:
            payload["operator"] = True
        token = jwt.encode(
            payload,
            self._key,
            algorithm=ALGORITHM,
            headers={"typ": TOKEN_TYPE, "kid": self.key_id},
        )
        with self._exclusive():
            ledger = self._read_ledger()
            ledger[record.token_id] = record
            self._write_ledger(ledger)
        return token

    # -- verifying -----------------------------------------------------------------------------

    def verify(self, token: str) -> TokenClaims:
        """The claims of a valid token; Unauthenticated names why a token is refused."""
        claims = self._verified.get(token) if isinstance(token, str) else None
        if claims is None:
            claims = self._verify_signed(token)
            if len(self._verified) >= _MAX_VERIFIED_TOKENS:
                self._verified.clear()
            self._verified[token] = claims
        # Checked on every call, remembered token or not: expiry and revocation change with time.
        now = self._clock()
        if claims.expires_at <= now:
            raise Unauthenticated(
                f"participant {_describe(claims)} expired at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(claims.expires_at))}: "
                "issue a new one with `fedgate tokens issue`"
            )
        revoked_at = self._revocations().get(claims.token_id)
        if revoked_at is not None:
            raise Unauthenticated(
                f"participant {_describe(claims)} was revoked at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(revoked_at))}: "
                "issue a new one with `fedgate tokens issue`"
            )
        return claims

    def _verify_signed(self, token: str) -> TokenClaims:
        """Signature, algorithm, type, issuer, audience and the form of the claims."""
        if not isinstance(token, str) or not token:
            raise Unauthenticated(
                "no participant token: pass the token issued by `fedgate tokens issue`"
            )
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(
                f"malformed participant token: longer than {MAX_TOKEN_BYTES} bytes"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed participant token: {exc}") from None
        algorithm = header.get("alg")
        if algorithm != ALGORITHM:
            raise Unauthenticated(
                f"participant token uses algorithm {algorithm!r}: only {ALGORITHM} tokens "
                "issued by this gateway are accepted"
            )
        if header.get("typ") != TOKEN_TYPE:
            raise Unauthenticated(
                f"not a participant token (type {header.get('typ')!r}, expected {TOKEN_TYPE!r})"
            )
        try:
            payload = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                # Time is checked below against our own clock, with a message naming the expiry.
                options={
                    "require": ["iss", "aud", "sub", "jti", "iat", "exp"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            kid = header.get("kid")
            hint = (
                f"it was signed by another token key ({kid!r}; this gateway's is "
                f"{self.key_id!r}): issued by another gateway or before the token key changed"
                if isinstance(kid, str) and kid != self.key_id
                else "it was changed after it was issued or signed with another key"
            )
            raise Unauthenticated(f"participant token signature does not verify: {hint}") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                "participant token is for another audience: this gateway accepts only "
                f"{self.audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                f"participant token was not issued by this gateway: expected issuer {self.issuer!r}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(
                f"malformed participant token: claim {exc.claim!r} is missing"
            ) from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed participant token: {exc}") from None
        return self._claims(payload)

    @staticmethod
    def _claims(payload: dict[str, Any]) -> TokenClaims:
        token_id, subject = payload["jti"], payload["sub"]
        agents, calls, expires = payload.get("agents", []), payload.get("calls", []), payload["exp"]
        if not isinstance(token_id, str) or not _TOKEN_ID.match(token_id):
            raise Unauthenticated("malformed participant token: claim 'jti' is not a token id")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("malformed participant token: claim 'sub' is not a string")
        for name, value in (("agents", agents), ("calls", calls)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise Unauthenticated(
                    f"malformed participant token: claim {name!r} is not a list of strings"
                )
        if (
            isinstance(expires, bool)
            or not isinstance(expires, int | float)
            or not 0 <= expires < 1e11  # also refuses NaN and infinities
        ):
            raise Unauthenticated("malformed participant token: claim 'exp' is not a time")
        operator = payload.get("operator", False)
        if not isinstance(operator, bool):
            raise Unauthenticated("malformed participant token: claim 'operator' is not a boolean")
        return TokenClaims(
            token_id, subject, tuple(agents), tuple(calls), float(expires), operator=operator
        )

    def _revocations(self) -> dict[str, float]:
        """The revoked token ids, re-read whenever the file was replaced or changed."""
        try:
            info = self.revocations_path.stat()
            state = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
        except FileNotFoundError:
            state = (0, 0, 0, 0)
        except OSError as exc:
            raise ConfigError(
                f"{self.revocations_path}: cannot read the token revocations: {exc.strerror}"
            ) from None
        with self._read_lock:
            if state != self._revocations_state:
                # Fail closed: an unreadable list raises and no token is accepted until fixed.
                self._revoked = {
                    token_id: entry[0] for token_id, entry in self._read_revocations().items()
                }
                self._revocations_state = state
            return self._revoked

    # -- permissions ---------------------------------------------------------------------------

    def check_register(self, claims: TokenClaims, agent: str) -> None:
        """Refuse unless the token may register `agent`."""
        if "*" in claims.agents or agent in claims.agents:
            return
        raise PermissionDenied(
            f"{_describe(claims)} may not register agent {agent!r}: issue one with --agent {agent}"
        )

    def check_operator(self, claims: TokenClaims, what: str) -> None:
        """Refuse unless the token is an operator token (it may read `what`)."""
        if claims.operator:
            return
        raise PermissionDenied(
            f"{_describe(claims)} may not read {what}: that takes an operator token, issued "
            "with `fedgate tokens issue --subject NAME --operator`"
        )

    def check_call(self, claims: TokenClaims, target_org: str, agent: str, skill: str) -> None:
        """Refuse unless the token may call target_org/agent.skill."""
        if call_allowed(claims.calls, target_org, agent, skill):
            return
        target = f"{target_org}/{agent}.{skill}"
        raise PermissionDenied(
            f"{_describe(claims)} may not call {target!r}: issue one with --call {target}"
        )

    # -- ledger and revocations ----------------------------------------------------------------

    def revoke(self, token_id: str) -> None:
        """Revoke a token; a running gateway refuses it from its next verify on."""
        with self._exclusive():
            ledger = self._read_ledger()
            record = ledger.get(token_id)
            if record is None:
                raise NotFound(
                    f"no token {token_id!r} in the ledger {self.ledger_path}: see "
                    "`fedgate tokens list` for the ids"
                )
            revocations = self._read_revocations()
            if token_id not in revocations:
                now = self._clock()
                revocations = {
                    jti: entry
                    for jti, entry in revocations.items()
                    if entry[1] > now - _KEEP_EXPIRED_REVOCATIONS_SECONDS
                }
                revocations[token_id] = (now, record.expires_at)
                self._write_revocations(revocations)
                ledger[token_id] = replace(record, revoked_at=now)
                self._write_ledger(ledger)

    def list(self) -> builtins.list[TokenRecord]:
        """Every token in the ledger, oldest first, with whether it was revoked."""
        with self._exclusive():
            ledger = self._read_ledger()
            revocations = self._read_revocations()
        records = []
        for record in ledger.values():
            if record.revoked_at is None and record.token_id in revocations:
                record = replace(record, revoked_at=revocations[record.token_id][0])
            records.append(record)
        return sorted(records, key=lambda r: (r.issued_at, r.token_id))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialize read-modify-write of the ledger and revocations across processes."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read_ledger(self) -> dict[str, TokenRecord]:
        data = _read_json(self.ledger_path, "token ledger")
        if data is None:
            return {}
        try:
            entries = data["tokens"]
            records = [TokenRecord.from_json(entry) for entry in entries]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{self.ledger_path}: the token ledger is not in the expected form ({exc}): "
                "restore it from a backup"
            ) from None
        return {record.token_id: record for record in records}

    def _write_ledger(self, ledger: dict[str, TokenRecord]) -> None:
        _write_json(
            self.ledger_path,
            {"version": 1, "tokens": [record.to_json() for record in ledger.values()]},
        )

    def _read_revocations(self) -> dict[str, tuple[float, float]]:
        """token id -> (revoked at, token expires at)."""
        data = _read_json(self.revocations_path, "token revocations")
        if data is None:
            return {}
        try:
            return {
                str(token_id): (float(entry["revoked_at"]), float(entry["expires_at"]))
                for token_id, entry in data["revoked"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{self.revocations_path}: the token revocations are not in the expected form "
                f"({exc}): restore the file from a backup"
            ) from None

    def _write_revocations(self, revocations: dict[str, tuple[float, float]]) -> None:
        _write_json(
            self.revocations_path,
            {
                "version": 1,
                "revoked": {
                    token_id: {"revoked_at": revoked_at, "expires_at": expires_at}
                    for token_id, (revoked_at, expires_at) in revocations.items()
                },
            },
        )


def token_authority(config: GatewayConfig) -> TokenAuthority:
    """The token authority of a configured gateway (files under its data_dir)."""
    return TokenAuthority(
        config.org,
        config.data_dir / KEY_FILE,
        config.data_dir / REVOCATIONS_FILE,
        ledger_path=config.data_dir / LEDGER_FILE,
    )
