"""Participant tokens: issuing, every refusal of `verify`, revocation, the ledger, permissions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import ConfigError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from gateway.identity.tokens import (
    TOKEN_TYPE,
    TokenAuthority,
    TokenClaims,
    call_allowed,
    normalize_call_pattern,
)

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_authority(
    directory: Path, org: str = "hospital", clock: Clock | None = None
) -> TokenAuthority:
    return TokenAuthority(
        org,
        directory / "token.key",
        directory / "token-revocations.json",
        clock=clock or Clock(),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(tmp_path: Path, clock: Clock) -> TokenAuthority:
    return make_authority(tmp_path / "data", clock=clock)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value).encode())


def good_payload(**changes: Any) -> dict[str, Any]:
    payload = {
        "iss": "fedgate:hospital",
        "aud": "fedgate:hospital:participant",
        "sub": "records-service",
        "jti": "a" * 32,
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        "agents": ["records"],
        "calls": ["insurer/claims.check"],
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def sign_with_token_key(authority: TokenAuthority, payload: dict[str, Any], **header: Any) -> str:
    """A token signed with the gateway's real token key, with any claims (as an insider could)."""
    key = serialization.load_pem_private_key(authority.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return jwt.encode(
        payload,
        key,
        algorithm="ES256",
        headers={"typ": TOKEN_TYPE, "kid": authority.key_id, **header},
    )


def refused(authority: TokenAuthority, token: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        authority.verify(token)
    return caught.value.message


# -- the key -----------------------------------------------------------------------------------


def test_token_key_is_created_owner_only_and_reused(tmp_path: Path) -> None:
    first = make_authority(tmp_path / "data")
    mode = stat.S_IMODE(first.key_path.stat().st_mode)
    assert mode == 0o600
    token = first.issue("svc", agents=["records"])
    second = make_authority(tmp_path / "data")
    assert second.key_id == first.key_id
    assert second.verify(token).subject == "svc"


def test_token_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    authority = make_authority(tmp_path)
    authority.key_path.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        make_authority(tmp_path)
    assert caught.value.message == (
        f"{authority.key_path}: the token key is accessible to other users (mode 644): run "
        f"`chmod 600 {authority.key_path}`"
    )


def test_token_key_of_another_curve_is_refused(tmp_path: Path) -> None:
    key_path = tmp_path / "token.key"
    key_path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    with pytest.raises(ConfigError, match="the token key must be ECDSA P-256"):
        make_authority(tmp_path)


# -- issue and verify --------------------------------------------------------------------------


def test_valid_token_round_trip(authority: TokenAuthority) -> None:
    token = authority.issue(
        "records-service",
        agents=["records"],
        calls=["insurer/claims.check", "lab/*"],
        ttl_seconds=3600,
    )
    claims = authority.verify(token)
    assert claims == TokenClaims(
        token_id=claims.token_id,
        subject="records-service",
        agents=("records",),
        calls=("insurer/claims.check", "lab/*.*"),
        expires_at=NOW + 3600,
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": TOKEN_TYPE, "kid": authority.key_id}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iss"] == "fedgate:hospital"
    assert payload["aud"] == "fedgate:hospital:participant"


def test_expired_token_is_refused(authority: TokenAuthority, clock: Clock) -> None:
    token = authority.issue("svc", agents=["records"], ttl_seconds=60)
    authority.verify(token)  # remembered as verified: expiry is still checked on every call
    clock.now += 60
    message = refused(authority, token)
    assert "expired at 2027-01-15T08:01:00Z" in message
    assert "issue a new one with `fedgate tokens issue`" in message


def test_wrong_audience_is_refused(authority: TokenAuthority) -> None:
    token = sign_with_token_key(authority, good_payload(aud="fedgate:hospital:federation"))
    assert refused(authority, token) == (
        "participant token is for another audience: this gateway accepts only "
        "'fedgate:hospital:participant'"
    )


def test_wrong_issuer_is_refused(authority: TokenAuthority) -> None:
    token = sign_with_token_key(authority, good_payload(iss="fedgate:lab"))
    assert refused(authority, token) == (
        "participant token was not issued by this gateway: expected issuer 'fedgate:hospital'"
    )


def test_token_of_another_gateway_is_refused(authority: TokenAuthority, tmp_path: Path) -> None:
    lab = make_authority(tmp_path / "lab", org="lab")
    message = refused(authority, lab.issue("svc", agents=["records"]))
    assert message.startswith(
        "participant token signature does not verify: it was signed by "
        f"another token key ('{lab.key_id}'"
    )


def test_alg_none_is_refused(authority: TokenAuthority) -> None:
    token = f"{segment({'alg': 'none', 'typ': TOKEN_TYPE})}.{segment(good_payload())}."
    assert refused(authority, token) == (
        "participant token uses algorithm 'none': only ES256 tokens issued by this gateway are "
        "accepted"
    )


def test_hs256_keyed_with_the_public_key_is_refused(authority: TokenAuthority) -> None:
    public_pem = (
        serialization.load_pem_private_key(authority.key_path.read_bytes(), password=None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = f"{segment({'alg': 'HS256', 'typ': TOKEN_TYPE})}.{segment(good_payload())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    assert refused(authority, token) == (
        "participant token uses algorithm 'HS256': only ES256 tokens issued by this gateway are "
        "accepted"
    )
    # The library layer refuses it too, should the header check ever go.
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, public_pem, algorithms=["ES256"], audience="fedgate:hospital:participant")


def test_tampered_payload_is_refused(authority: TokenAuthority) -> None:
    token = authority.issue("svc", agents=["records"])
    header, _, signature = token.split(".")
    forged = good_payload(agents=["*"], calls=["*/*.*"], jti="b" * 32)
    message = refused(authority, f"{header}.{segment(forged)}.{signature}")
    assert message == (
        "participant token signature does not verify: it was changed after it was issued or "
        "signed with another key"
    )


@pytest.mark.parametrize(
    ("token", "cause"),
    [
        ("", "no participant token"),
        ("not-a-token", "malformed participant token: Not enough segments"),
        ("a.b.c", "malformed participant token: Invalid header padding"),
        ("x" * 9000, "malformed participant token: longer than 8192 bytes"),
    ],
)
def test_malformed_token_is_refused(authority: TokenAuthority, token: str, cause: str) -> None:
    assert refused(authority, token).startswith(cause)


def test_missing_claim_is_refused(authority: TokenAuthority) -> None:
    token = sign_with_token_key(authority, good_payload(jti=None))
    assert refused(authority, token) == "malformed participant token: claim 'jti' is missing"


def test_wrong_claim_types_are_refused(authority: TokenAuthority) -> None:
    token = sign_with_token_key(authority, good_payload(calls="insurer/*"))
    assert refused(authority, token) == (
        "malformed participant token: claim 'calls' is not a list of strings"
    )


def test_other_token_type_is_refused(authority: TokenAuthority) -> None:
    token = sign_with_token_key(authority, good_payload(), typ="fedgate-delegation+jwt")
    assert refused(authority, token) == (
        "not a participant token (type 'fedgate-delegation+jwt', expected "
        "'fedgate-participant+jwt')"
    )


@pytest.mark.parametrize(
    ("kwargs", "cause"),
    [
        ({"subject": ""}, "subject '' is not valid"),
        ({"subject": "a\nb", "agents": ["x"]}, "subject 'a\\nb' is not valid"),
        ({"agents": ["re cords"]}, "agent 're cords' is not a valid agent name"),
        ({"calls": ["insurer/claims-*"]}, "call pattern 'insurer/claims-*' is malformed"),
        ({"calls": ["Insurer/claims"]}, "call pattern 'Insurer/claims' is malformed"),
        ({}, "a token for 'svc' would grant nothing: pass --agent NAME"),
        ({"agents": ["x"], "ttl_seconds": 0}, "token lifetime of 0 days is out of range"),
        (
            {"agents": ["x"], "ttl_seconds": 400 * 86_400},
            "token lifetime of 400 days is out of range: more than 0 and at most 366 days",
        ),
    ],
)
def test_issue_refuses_bad_input(
    authority: TokenAuthority, kwargs: dict[str, Any], cause: str
) -> None:
    subject = kwargs.pop("subject", "svc")
    with pytest.raises(InvalidArgument) as caught:
        authority.issue(subject, **kwargs)
    assert caught.value.message.startswith(cause)
    assert authority.list() == []


# -- revocation and the ledger -----------------------------------------------------------------


def test_revocation_by_another_instance_takes_effect_at_once(
    authority: TokenAuthority, tmp_path: Path
) -> None:
    token = authority.issue("records-service", agents=["records"])
    kept = authority.issue("other", agents=["records"])
    claims = authority.verify(token)  # the running gateway has read the (empty) revocations
    cli_side = make_authority(tmp_path / "data")  # as `fedgate tokens revoke` in another process
    cli_side.revoke(claims.token_id)
    message = refused(authority, token)
    assert message == (
        f"participant token '{claims.token_id}' (records-service) was revoked at "
        "2027-01-15T08:00:00Z: issue a new one with `fedgate tokens issue`"
    )
    assert authority.verify(kept).subject == "other"
    cli_side.revoke(claims.token_id)  # revoking twice is harmless
    assert refused(authority, token) == message


def test_revoke_unknown_token_names_the_fix(authority: TokenAuthority) -> None:
    with pytest.raises(NotFound) as caught:
        authority.revoke("nope")
    assert caught.value.message.startswith("no token 'nope' in the ledger ")
    assert caught.value.message.endswith("see `fedgate tokens list` for the ids")


def test_ledger_lists_tokens_but_never_stores_them(authority: TokenAuthority, clock: Clock) -> None:
    first = authority.issue("a", agents=["x"])
    clock.now += 1
    second = authority.issue("b", calls=["insurer/claims"])
    authority.revoke(authority.verify(first).token_id)
    records = authority.list()
    assert [(r.subject, r.agents, r.calls, r.revoked) for r in records] == [
        ("a", ("x",), (), True),
        ("b", (), ("insurer/claims.*",), False),
    ]
    assert records[0].revoked_at == NOW + 1
    assert records[1].expires_at == NOW + 1 + 30 * 86_400
    for path in (authority.ledger_path, authority.revocations_path):
        text = path.read_text()
        for token in (first, second):
            assert token not in text
            assert token.split(".")[2] not in text


def test_old_revocations_are_pruned(authority: TokenAuthority, clock: Clock) -> None:
    old = authority.verify(authority.issue("old", agents=["x"], ttl_seconds=60)).token_id
    new = authority.verify(authority.issue("new", agents=["x"])).token_id
    authority.revoke(old)
    clock.now += 2 * 86_400
    authority.revoke(new)
    revoked = json.loads(authority.revocations_path.read_text())["revoked"]
    assert set(revoked) == {new}


def test_unreadable_revocations_fail_closed(authority: TokenAuthority) -> None:
    token = authority.issue("svc", agents=["x"])
    authority.revocations_path.write_text("{not json")
    with pytest.raises(ConfigError) as caught:
        authority.verify(token)
    assert "the token revocations is not valid JSON" in caught.value.message
    assert caught.value.message.endswith("restore it from a backup")


def test_concurrent_issuers_share_one_ledger(tmp_path: Path) -> None:
    make_authority(tmp_path)  # creates the key once

    def issue(n: int) -> None:
        make_authority(tmp_path).issue(f"svc-{n}", agents=["x"])

    threads = [threading.Thread(target=issue, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.subject for r in make_authority(tmp_path).list()) == sorted(
        f"svc-{n}" for n in range(16)
    )


# -- permissions -------------------------------------------------------------------------------


def claims_with(agents: tuple[str, ...] = (), calls: tuple[str, ...] = ()) -> TokenClaims:
    return TokenClaims("t1", "records-service", agents, calls, NOW + 60)


def test_check_register(authority: TokenAuthority) -> None:
    authority.check_register(claims_with(agents=("records",)), "records")
    authority.check_register(claims_with(agents=("*",)), "anything")
    with pytest.raises(PermissionDenied) as caught:
        authority.check_register(claims_with(agents=("records",)), "billing")
    assert caught.value.message == (
        "token 't1' (records-service) may not register agent 'billing': issue one with "
        "--agent billing"
    )


@pytest.mark.parametrize(
    ("pattern", "normalized"),
    [
        ("*", "*/*.*"),
        ("insurer/claims.check", "insurer/claims.check"),
        ("insurer/claims", "insurer/claims.*"),
        ("insurer/*", "insurer/*.*"),
        ("*/claims.check", "*/claims.check"),
        ("*/*.check", "*/*.check"),
    ],
)
def test_call_pattern_grammar(pattern: str, normalized: str) -> None:
    assert normalize_call_pattern(pattern) == normalized


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "insurer",
        "insurer/",
        "/claims",
        "insurer/claims.",
        "insurer/a.b.c",
        "ins*/claims",
        "insurer/claims*",
        "**",
        "insurer/claims/check",
    ],
)
def test_malformed_call_patterns(pattern: str) -> None:
    with pytest.raises(InvalidArgument, match=r"use ORG/AGENT\.SKILL, ORG/AGENT or"):
        normalize_call_pattern(pattern)


@pytest.mark.parametrize(
    ("patterns", "target", "allowed"),
    [
        (["insurer/claims.check"], ("insurer", "claims", "check"), True),
        (["insurer/claims.check"], ("insurer", "claims", "submit"), False),
        (["insurer/claims.check"], ("lab", "claims", "check"), False),
        (["insurer/claims.*"], ("insurer", "claims", "submit"), True),
        (["insurer/claims.*"], ("insurer", "billing", "submit"), False),
        (["insurer/*.*"], ("insurer", "billing", "submit"), True),
        (["insurer/*.*"], ("insurer-eu", "billing", "submit"), False),
        (["*/claims.check"], ("lab", "claims", "check"), True),
        (["*/*.check"], ("lab", "x", "check"), True),
        (["*/*.*"], ("hospital", "records", "lookup"), True),
        ([], ("insurer", "claims", "check"), False),
        (["lab/*.*", "insurer/claims.check"], ("insurer", "claims", "check"), True),
    ],
)
def test_check_call_patterns(
    authority: TokenAuthority, patterns: list[str], target: tuple[str, str, str], allowed: bool
) -> None:
    claims = claims_with(calls=tuple(patterns))
    assert call_allowed(patterns, *target) is allowed
    if allowed:
        authority.check_call(claims, *target)
        return
    with pytest.raises(PermissionDenied) as caught:
        authority.check_call(claims, *target)
    org, agent, skill = target
    assert caught.value.message == (
        f"token 't1' (records-service) may not call '{org}/{agent}.{skill}': issue one with "
        f"--call {org}/{agent}.{skill}"
    )


def test_issued_patterns_are_checked_end_to_end(authority: TokenAuthority) -> None:
    claims = authority.verify(authority.issue("svc", calls=["insurer/claims"]))
    authority.check_call(claims, "insurer", "claims", "check")
    with pytest.raises(PermissionDenied):
        authority.check_call(claims, "insurer", "billing", "check")
    with pytest.raises(PermissionDenied):
        authority.check_register(claims, "claims")


@pytest.mark.parametrize("exp", [10**12, -1, "soon"])
def test_absurd_expiry_is_refused(authority: TokenAuthority, exp: object) -> None:
    token = sign_with_token_key(authority, good_payload(exp=exp))
    assert refused(authority, token) == "malformed participant token: claim 'exp' is not a time"


# -- operator tokens: the only ones that read the gateway's own views ------------------------------


def test_an_operator_token_grants_the_operator_views_only(authority: TokenAuthority) -> None:
    token = authority.issue("ops", operator=True)
    claims = authority.verify(token)
    assert claims.operator and claims.agents == () and claims.calls == ()
    assert jwt.decode(token, options={"verify_signature": False})["operator"] is True
    authority.check_operator(claims, "the peers' status")
    with pytest.raises(PermissionDenied):
        authority.check_register(claims, "records")
    with pytest.raises(PermissionDenied):
        authority.check_call(claims, "insurer", "claims", "check")
    (record,) = authority.list()
    assert record.operator and record.subject == "ops"


def test_no_other_grant_makes_an_operator(authority: TokenAuthority) -> None:
    everything = authority.verify(authority.issue("bot", agents=["*"], calls=["*"]))
    assert not everything.operator
    assert "operator" not in jwt.decode(
        authority.issue("bot", calls=["*"]), options={"verify_signature": False}
    )
    with pytest.raises(PermissionDenied) as caught:
        authority.check_operator(everything, "the connected agents")
    assert caught.value.message == (
        f"token {everything.token_id!r} (bot) may not read the connected agents: that takes an "
        "operator token, issued with `fedgate tokens issue --subject NAME --operator`"
    )


def test_an_operator_claim_of_the_wrong_type_is_refused(authority: TokenAuthority) -> None:
    token = sign_with_token_key(authority, good_payload(operator="yes"))
    assert refused(authority, token) == (
        "malformed participant token: claim 'operator' is not a boolean"
    )


def test_a_ledger_written_before_operator_tokens_still_reads(authority: TokenAuthority) -> None:
    authority.issue("records-service", agents=["records"])
    ledger = json.loads(authority.ledger_path.read_text())
    for entry in ledger["tokens"]:
        del entry["operator"]
    authority.ledger_path.write_text(json.dumps(ledger))
    (record,) = authority.list()
    assert not record.operator
