"""Delegation statements: who asked, carried from the requesting gateway to the responding one.

With each task the requesting gateway sends a short-lived JWT that it signs with its own TLS key
(ECDSA P-256, so ES256) and that carries its certificate, so the responder checks it without any
prior key exchange:

    header   {"alg": "ES256", "typ": "fedgate-delegation+jwt", "x5c": [<signer cert, DER, base64>]}
    payload  {"iss": <sending org>, "aud": <target org>, "sub": <requesting agent or user>,
              "roles": [...], "purpose": "...", "task_id": "...", "jti": <unique>,
              "iat": ..., "exp": ...  (default 5 minutes ahead),
              "chs": <sequence>, "chh": <head hash>  (the sending gateway's committed audit
              chain position when it signed: a signed lower bound on its log for the responder)}

The responder accepts a statement only when all of these hold, and names the first that fails:
the algorithm is ES256; the certificate was issued by the federation CA and is valid now; it names
the organization proven by the connection's mTLS client certificate (guarantee 1: a body never
changes who the peer is); `iss` is that same organization; `aud` is the responder; it has not
expired and was not issued for longer than the responder allows; it is for this task; `chs` and
`chh`, when present, come together and are a sequence and a 64-hex-digit hash; and its `jti` was
not seen before within its lifetime (replay). docs/protocol.md has the exact format.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import heapq
import json
import math
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gateway.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from gateway.identity.certs import certificate_facts
from gateway.identity.signing import Signer, Verifier

ALGORITHM = "ES256"
STATEMENT_TYPE = "fedgate-delegation+jwt"
DEFAULT_TTL_SECONDS = 300.0
MAX_STATEMENT_BYTES = 16 * 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]*$")
_ORG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_MAX_TEXT = 256
_MAX_ROLES = 64
_HEAD = re.compile(r"^[0-9a-f]{64}$")
_MAX_SEQUENCE = 2**53 - 1


@dataclass(frozen=True)
class Delegation:
    """A verified statement of who asked for a task, and why."""

    issuer_org: str
    subject: str
    roles: tuple[str, ...]
    purpose: str
    audience_org: str
    token_id: str
    task_id: str
    expires_at: float
    # The issuer's committed audit chain position when it signed (claims chs, chh); None from a
    # gateway that does not send it.
    chain_sequence: int | None = None
    chain_head: str | None = None

    def claims(self) -> dict[str, str | tuple[str, ...]]:
        """What the sharing policy sees of the requester."""
        return {"role": self.roles, "purpose": self.purpose, "subject": self.subject}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(segment: str) -> bytes:
    if not _SEGMENT.match(segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_segment(value: dict[str, Any]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8"))


@functools.lru_cache(maxsize=16)
def _header_segment(cert_der: bytes) -> str:
    """The encoded header of our statements: constant per signing certificate, so built once.

    Keyed by the certificate itself, so a rotated certificate gets its own header at once.
    """
    return _json_segment(
        {
            "alg": ALGORITHM,
            "typ": STATEMENT_TYPE,
            "x5c": [base64.b64encode(cert_der).decode("ascii")],
        }
    )


def _sign_jws(signer: Signer, header_segment: str, payload: dict[str, Any]) -> str:
    """A compact JWS over an encoded header and payload, ES256 with the signer's key (r || s)."""
    signing_input = f"{header_segment}.{_json_segment(payload)}"
    r, s = decode_dss_signature(signer.sign(signing_input.encode("ascii")))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{_b64url(signature)}"


def issue_delegation(
    signer: Signer,
    *,
    audience_org: str,
    subject: str,
    roles: Iterable[str] = (),
    purpose: str = "",
    task_id: str,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    chain_sequence: int | None = None,
    chain_head: str | None = None,
) -> str:
    """A statement, signed as the signer's organization, that `subject` asks `audience_org`.

    `chain_sequence` and `chain_head` (together or not at all) are our committed audit head.
    """
    if not _ORG.match(audience_org):
        raise InvalidArgument(f"delegation audience {audience_org!r} is not an organization name")
    role_list = list(roles)
    _check_text("subject", subject, InvalidArgument, required=True)
    _check_text("purpose", purpose, InvalidArgument)
    _check_text("task id", task_id, InvalidArgument, required=True)
    _check_roles(role_list, InvalidArgument)
    if not ttl_seconds > 0:
        raise InvalidArgument(f"delegation lifetime must be positive, got {ttl_seconds:g} s")
    _check_chain(chain_sequence, chain_head, InvalidArgument)
    now = time.time()
    payload = {
        "iss": signer.org,
        "aud": audience_org,
        "sub": subject,
        "roles": role_list,
        "purpose": purpose,
        "task_id": task_id,
        "jti": uuid.uuid4().hex,
        "iat": int(now),
        "exp": int(now + ttl_seconds),
    }
    if chain_sequence is not None:
        payload["chs"] = chain_sequence
        payload["chh"] = chain_head
    return _sign_jws(signer, _header_segment(signer.cert_der), payload)


def _check_text(name: str, value: Any, error: type[Exception], *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise error(f"delegation {name} must be a string")
    if required and not value:
        raise error(f"delegation {name} is empty")
    if len(value) > _MAX_TEXT:
        raise error(f"delegation {name} is longer than {_MAX_TEXT} characters")


def _check_roles(roles: Any, error: type[Exception]) -> None:
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise error("delegation roles must be a list of non-empty strings")
    if len(roles) > _MAX_ROLES or any(len(r) > _MAX_TEXT for r in roles):
        raise error(f"delegation roles: at most {_MAX_ROLES}, each at most {_MAX_TEXT} characters")


def _check_chain(sequence: Any, head: Any, error: type[Exception]) -> None:
    if sequence is None and head is None:
        return
    if (
        isinstance(sequence, bool)
        or not isinstance(sequence, int)
        or not 0 <= sequence <= _MAX_SEQUENCE
        or not isinstance(head, str)
        or not _HEAD.match(head)
    ):
        raise error(
            "delegation chain position: 'chs' is a sequence from 0 to 2**53 - 1 and 'chh' a head "
            "hash of 64 lowercase hex digits, both or neither"
        )


def _epoch(value: Any) -> float | None:
    """A JSON number usable as a time (finite, after 1970, before 5138), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if 0 <= result < 1e11 else None  # also refuses NaN and infinities


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _SeenStatements:
    """Ids (jti) of accepted statements until they expire: a bounded replay cache.

    Kept compact, because a peer may send its full rate of statements for their whole lifetime:
    per issuer, one set of 62-bit digests of the ids, and the same digests listed by the second
    in which they may be forgotten. An entry costs about 80 bytes (a 36-byte int, its slot in the
    set and in its second's list) where an (issuer, id) tuple key with its expiry and heap entry
    cost about 280 (measured with tracemalloc). Entries are forgotten in the first second after
    their time, never before (a replay is never accepted). Two ids of one issuer sharing a
    digest (about one chance in 10^8 at a million entries) make the second look like a replay:
    refused, and the sending gateway's next statement passes.

    The bound is per issuer, in bytes and in entries, so that one peer filling its share cannot
    lock out the others. At the bound the cache fails closed: a new statement of that issuer is
    refused with RESOURCE_EXHAUSTED (no entry is ever evicted early, which would reopen
    replays) until entries expire.
    """

    def __init__(self, max_per_issuer: int, max_bytes_per_issuer: int) -> None:
        self._max_per_issuer = max_per_issuer
        self._max_bytes_per_issuer = max_bytes_per_issuer
        self._issuers: dict[str, _IssuerIds] = {}
        self._lock = threading.Lock()

    def count(self, now: float) -> int:
        """How many ids are remembered at `now` (the expired ones forgotten first)."""
        with self._lock:
            for ids in self._issuers.values():
                ids.expire(now)
            return sum(len(ids.digests) for ids in self._issuers.values())

    def bytes_used(self, issuer: str) -> int:
        """About what the entries of `issuer` cost in memory now."""
        with self._lock:
            ids = self._issuers.get(issuer)
            return ids.bytes_used() if ids is not None else 0

    def add(self, key: tuple[str, str], forget_at: float, now: float) -> bool:
        """Record `key` (issuer, id) until `forget_at`; False if it is already recorded (a replay).

        Raises ResourceExhausted when `key`'s issuer is at its bound (see the class).
        """
        issuer, token_id = key
        digest = _id_digest(token_id)
        with self._lock:
            ids = self._issuers.get(issuer)
            if ids is None:
                ids = self._issuers[issuer] = _IssuerIds()
            ids.expire(now)
            if digest in ids.digests:
                return False
            count = len(ids.digests)
            if count >= self._max_per_issuer:
                raise ResourceExhausted(
                    f"organization {issuer!r} sent too many delegation statements within their "
                    f"lifetime (limit {self._max_per_issuer}): retry later"
                )
            if ids.bytes_used() + _ENTRY_BYTES > self._max_bytes_per_issuer:
                raise ResourceExhausted(
                    f"organization {issuer!r} sent more delegation statements within their "
                    f"lifetime ({count}) than this gateway remembers against replay "
                    f"({self._max_bytes_per_issuer // 1024} KiB per organization): retry later"
                )
            ids.add(digest, math.ceil(forget_at))
            return True


class _IssuerIds:
    """The remembered ids of one issuer: their digests, and the same listed by forget second."""

    __slots__ = ("by_second", "digests", "seconds")

    def __init__(self) -> None:
        self.digests: set[int] = set()
        self.by_second: dict[int, list[int]] = {}
        self.seconds: list[int] = []  # a heap of the keys of by_second

    def add(self, digest: int, second: int) -> None:
        self.digests.add(digest)
        listed = self.by_second.get(second)
        if listed is None:
            listed = self.by_second[second] = []
            heapq.heappush(self.seconds, second)
        listed.append(digest)

    def expire(self, now: float) -> None:
        while self.seconds and self.seconds[0] <= now:
            for digest in self.by_second.pop(heapq.heappop(self.seconds)):
                self.digests.discard(digest)

    def bytes_used(self) -> int:
        """The set's table, the ints, the list slots, and each second's list and key."""
        return (
            sys.getsizeof(self.digests)
            + len(self.digests) * (_INT_BYTES + 8)
            + len(self.by_second) * _SECOND_BYTES
        )


_INT_BYTES = sys.getsizeof(2**61)  # a 62-bit digest as a Python int
_SECOND_BYTES = sys.getsizeof([]) + 100  # a second's list, its key and its dict and heap slots
_ENTRY_BYTES = _INT_BYTES + 8 + 50  # with its share of the set's table (at most 3/5 full)
DEFAULT_REPLAY_BYTES_PER_PEER = 32 * 1024 * 1024  # 200 statements/s for 900 s take 17 MB


def _id_digest(token_id: str) -> int:
    return (
        int.from_bytes(
            hashlib.blake2b(token_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        )
        >> 2
    )


class DelegationVerifier:
    """Checks delegation statements arriving at the gateway of `org`."""

    def __init__(
        self,
        org: str,
        verifier: Verifier,
        *,
        max_ttl_seconds: float = 900,
        clock_skew_seconds: float = 30,
        max_seen_per_peer: int = 1_000_000,
        max_replay_bytes_per_peer: int = DEFAULT_REPLAY_BYTES_PER_PEER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.org = org
        self._verifier = verifier
        self.max_ttl_seconds = max_ttl_seconds
        self.clock_skew_seconds = clock_skew_seconds
        self._clock = clock
        self._seen = _SeenStatements(max_seen_per_peer, max_replay_bytes_per_peer)

    @property
    def seen_count(self) -> int:
        """How many statement ids are remembered against replay right now."""
        return self._seen.count(self._clock())

    def verify(self, token: str, *, peer_org: str, task_id: str) -> Delegation:
        """The delegation of a valid statement from `peer_org` (the mTLS-proven org) for task_id.

        Raises Unauthenticated (unusable statement) or PermissionDenied (an organization other
        than the connection's speaks), naming the cause.
        """
        header, payload, signing_input, signature = _parse(token)
        algorithm = header.get("alg")
        if algorithm != ALGORITHM:
            raise Unauthenticated(
                f"delegation statement uses algorithm {algorithm!r}: only {ALGORITHM} signed "
                "with the sending gateway's certificate is accepted"
            )
        if header.get("typ") != STATEMENT_TYPE:
            raise Unauthenticated(
                f"not a delegation statement (type {header.get('typ')!r}, expected "
                f"{STATEMENT_TYPE!r})"
            )
        cert_der = _signer_certificate(header)
        if len(signature) != 64:
            raise Unauthenticated(
                "malformed delegation statement: an ES256 signature is 64 bytes, got "
                f"{len(signature)}"
            )
        der_signature = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        now = self._clock()
        try:
            # Federation CA (as trusted now), validity now, organization == the connection's,
            # and the signature, on every statement; only certificate parsing and the chain
            # check are remembered, by the Verifier, until its CA set is rotated.
            self._verifier.verify(
                signing_input,
                der_signature,
                cert_der,
                peer_org,
                at=dt.datetime.fromtimestamp(now, dt.UTC),
            )
        except PermissionDenied as exc:
            raise PermissionDenied(
                f"delegation statement refused: {exc.message} (the connection is authenticated "
                f"as {peer_org!r}; a gateway may only vouch for its own requesters)"
            ) from None
        except Unauthenticated as exc:
            raise Unauthenticated(f"delegation statement refused: {exc.message}") from None

        issuer = payload.get("iss")
        if issuer != peer_org:
            raise PermissionDenied(
                f"delegation statement names issuer {issuer!r}, but it comes from organization "
                f"{peer_org!r} (its certificate and this connection): a gateway may only speak "
                "for its own organization"
            )
        audience = payload.get("aud")
        if audience != self.org:
            raise Unauthenticated(
                f"delegation statement is addressed to {audience!r}, not to this gateway's "
                f"organization {self.org!r}"
            )
        issued_at, expires_at = _epoch(payload.get("iat")), _epoch(payload.get("exp"))
        for name, value in (("iat", issued_at), ("exp", expires_at)):
            if value is None:
                raise Unauthenticated(
                    f"malformed delegation statement: {name!r} is not a time in epoch seconds"
                )
        assert issued_at is not None and expires_at is not None
        skew = self.clock_skew_seconds
        if expires_at + skew <= now:
            raise Unauthenticated(
                f"delegation statement of {issuer!r} expired {now - expires_at:.0f} s ago: the "
                "requesting gateway must send a fresh one (check both clocks if this repeats)"
            )
        if issued_at - skew > now:
            raise Unauthenticated(
                f"delegation statement of {issuer!r} is issued {issued_at - now:.0f} s in the "
                "future: check the clocks of both gateways"
            )
        if expires_at - issued_at > self.max_ttl_seconds:
            raise Unauthenticated(
                f"delegation statement of {issuer!r} is valid for {expires_at - issued_at:.0f} s, "
                f"longer than the {self.max_ttl_seconds:g} s this gateway accepts"
            )
        if payload.get("task_id") != task_id:
            raise Unauthenticated(
                f"delegation statement is for task {payload.get('task_id')!r}, not for task "
                f"{task_id!r}"
            )
        subject, roles, purpose, token_id = (
            payload.get("sub"),
            payload.get("roles", []),
            payload.get("purpose", ""),
            payload.get("jti"),
        )

        def malformed(message: str) -> Unauthenticated:
            return Unauthenticated(f"malformed delegation statement: {message}")

        try:
            _check_text("subject", subject, ValueError, required=True)
            _check_text("purpose", purpose, ValueError)
            _check_text("id (jti)", token_id, ValueError, required=True)
            _check_roles(roles, ValueError)
            _check_chain(payload.get("chs"), payload.get("chh"), ValueError)
        except ValueError as exc:
            raise malformed(str(exc)) from None
        assert isinstance(token_id, str) and isinstance(subject, str)
        if not self._seen.add((peer_org, token_id), expires_at + skew, now):
            raise Unauthenticated(
                f"delegation statement {token_id!r} of {issuer!r} was already used (a replay): "
                "every task carries a fresh statement"
            )
        return Delegation(
            issuer_org=peer_org,
            subject=subject,
            roles=tuple(roles),
            purpose=purpose,
            audience_org=self.org,
            token_id=token_id,
            task_id=task_id,
            expires_at=expires_at,
            chain_sequence=payload.get("chs"),
            chain_head=payload.get("chh"),
        )


def _parse(token: Any) -> tuple[Mapping[str, Any], dict[str, Any], bytes, bytes]:
    """Header, payload, signing input and raw signature of a compact JWS."""
    if not isinstance(token, str) or not token:
        raise Unauthenticated("no delegation statement came with the task")
    if len(token) > MAX_STATEMENT_BYTES:
        raise Unauthenticated(
            f"malformed delegation statement: longer than {MAX_STATEMENT_BYTES} bytes"
        )
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated(
            f"malformed delegation statement: a JWS has 3 parts separated by '.', got {len(parts)}"
        )
    header = _decode_header(parts[0])
    payload = _decode_segment("payload", parts[1])
    signature = _decode_segment("signature", parts[2])
    return header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def _decode_segment(name: str, segment: str) -> Any:
    """The raw bytes (signature) or the JSON object (header, payload) of one JWS segment."""
    try:
        raw = _unb64url(segment)
        if name == "signature":
            return raw
        # NaN and Infinity are not JSON; a NaN time would slip past every comparison.
        value = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise Unauthenticated(
            f"malformed delegation statement: its {name} is not base64url"
            + ("" if name == "signature" else " JSON")
        ) from None
    if not isinstance(value, dict):
        raise Unauthenticated(f"malformed delegation statement: its {name} is not an object")
    return value


@functools.lru_cache(maxsize=64)
def _decode_header(segment: str) -> Mapping[str, Any]:
    """A decoded header, kept read-only: a peer sends the same one with every statement.

    Only the decoding is remembered; every check on the header runs on every statement.
    """
    return MappingProxyType(_decode_segment("header", segment))


def _signer_certificate(header: Mapping[str, Any]) -> bytes:
    chain = header.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise Unauthenticated(
            "malformed delegation statement: header 'x5c' must hold exactly the signing "
            "gateway's certificate"
        )
    try:
        der = base64.b64decode(chain[0], validate=True)
        certificate_facts(der)
    except (binascii.Error, ValueError):
        raise Unauthenticated(
            "malformed delegation statement: header 'x5c' is not a base64 DER certificate"
        ) from None
    return der
