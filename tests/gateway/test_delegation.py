"""Delegation statements: the round trip, and every refusal, each with its type and message.

The requesting gateway is 'hospital'; the responder is 'insurer' (peer_org is what the mTLS
client certificate of the connection proved).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from gateway.identity.certs import issue_gateway_cert, load_cert, write_pair
from gateway.identity.delegation import (
    STATEMENT_TYPE,
    Delegation,
    DelegationVerifier,
    _json_segment,
    _sign_jws,
    issue_delegation,
)
from gateway.identity.signing import Signer, Verifier
from tests.conftest import Pki, ca_pair


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def signer(pki: Pki, name: str) -> Signer:
    return Signer.from_files(pki.cert(name), pki.key(name))


@pytest.fixture
def hospital(pki: Pki) -> Signer:
    return signer(pki, "hospital")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def insurer(pki: Pki, clock: Clock) -> DelegationVerifier:
    return DelegationVerifier("insurer", Verifier.from_file(pki.ca), clock=clock)


def statement(hospital: Signer, **changes: Any) -> str:
    arguments: dict[str, Any] = {
        "audience_org": "insurer",
        "subject": "dr-house",
        "roles": ["physician", "billing"],
        "purpose": "treatment",
        "task_id": "task-1",
    }
    arguments.update(changes)
    return issue_delegation(hospital, **arguments)


def crafted(
    signer: Signer,
    *,
    cert_of: Signer | None = None,
    header: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A statement with any header and claims, signed by `signer`, carrying `cert_of`'s cert."""
    now = int(time.time())
    payload = {
        "iss": signer.org,
        "aud": "insurer",
        "sub": "dr-house",
        "roles": ["physician"],
        "purpose": "treatment",
        "task_id": "task-1",
        "jti": f"jti-{time.time_ns()}",
        "iat": now,
        "exp": now + 300,
    }
    payload.update(claims)
    full_header = {
        "alg": "ES256",
        "typ": STATEMENT_TYPE,
        "x5c": [base64.b64encode((cert_of or signer).cert_der).decode()],
    }
    full_header.update(header or {})
    return _sign_jws(signer, _json_segment(full_header), payload)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")

    def load(part: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return result

    return load(header), load(payload), signature


def refused(
    verifier: DelegationVerifier,
    token: str,
    error: type[Exception] = Unauthenticated,
    *,
    peer_org: str = "hospital",
    task_id: str = "task-1",
) -> str:
    with pytest.raises(error) as caught:
        verifier.verify(token, peer_org=peer_org, task_id=task_id)
    assert type(caught.value) is error
    message: str = caught.value.message  # type: ignore[attr-defined]
    return message


# -- the round trip ----------------------------------------------------------------------------


def test_valid_statement_round_trip(hospital: Signer, insurer: DelegationVerifier) -> None:
    token = statement(hospital)
    delegation = insurer.verify(token, peer_org="hospital", task_id="task-1")
    header, payload, _ = segments(token)
    assert header["alg"] == "ES256" and header["typ"] == STATEMENT_TYPE
    assert base64.b64decode(header["x5c"][0]) == hospital.cert_der
    assert payload["exp"] - payload["iat"] == 300
    assert delegation == Delegation(
        issuer_org="hospital",
        subject="dr-house",
        roles=("physician", "billing"),
        purpose="treatment",
        audience_org="insurer",
        token_id=payload["jti"],
        task_id="task-1",
        expires_at=float(payload["exp"]),
    )
    assert delegation.claims() == {
        "role": ("physician", "billing"),
        "purpose": "treatment",
        "subject": "dr-house",
    }


def test_every_statement_has_its_own_id(hospital: Signer) -> None:
    ids = {segments(statement(hospital))[1]["jti"] for _ in range(20)}
    assert len(ids) == 20


def test_issue_refuses_bad_input(hospital: Signer) -> None:
    with pytest.raises(InvalidArgument, match="delegation audience 'Insurer!' is not an"):
        statement(hospital, audience_org="Insurer!")
    with pytest.raises(InvalidArgument, match="delegation subject is empty"):
        statement(hospital, subject="")
    with pytest.raises(InvalidArgument, match="delegation roles must be a list of non-empty"):
        statement(hospital, roles=[""])
    with pytest.raises(InvalidArgument, match="delegation lifetime must be positive, got 0 s"):
        statement(hospital, ttl_seconds=0)


# -- algorithms and signatures -----------------------------------------------------------------


def test_alg_none_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    header, payload, _ = segments(statement(hospital))
    header["alg"] = "none"
    token = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}."
    assert refused(insurer, token) == (
        "delegation statement uses algorithm 'none': only ES256 signed with the sending "
        "gateway's certificate is accepted"
    )


def test_hs256_keyed_with_the_certificate_is_refused(
    pki: Pki, hospital: Signer, insurer: DelegationVerifier
) -> None:
    header, payload, _ = segments(statement(hospital))
    header["alg"] = "HS256"
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    for secret in (pki.cert("hospital").read_bytes(), hospital.cert_der):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert refused(insurer, f"{signing_input}.{b64url(mac)}") == (
            "delegation statement uses algorithm 'HS256': only ES256 signed with the sending "
            "gateway's certificate is accepted"
        )


@pytest.mark.parametrize("algorithm", ["ES384", "RS256", "EdDSA", None])
def test_other_algorithms_are_refused(
    hospital: Signer, insurer: DelegationVerifier, algorithm: str | None
) -> None:
    token = crafted(hospital, header={"alg": algorithm})
    assert refused(insurer, token).startswith(
        f"delegation statement uses algorithm {algorithm!r}: only ES256"
    )


def test_tampered_statement_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    header, _, signature = statement(hospital).split(".")
    claims = segments(statement(hospital))[1]
    claims["roles"] = ["admin"]
    token = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    assert refused(insurer, token) == (
        "delegation statement refused: the signature of 'hospital' does not verify: the signed "
        "content was changed after signing or signed with another key"
    )


def test_certificate_of_another_key_is_refused(
    pki: Pki, hospital: Signer, insurer: DelegationVerifier
) -> None:
    # Signed with mallory's key, presenting hospital's (public, valid) certificate.
    token = crafted(signer(pki, "mallory"), cert_of=hospital, iss="hospital")
    assert refused(insurer, token) == (
        "delegation statement refused: the signature of 'hospital' does not verify: the signed "
        "content was changed after signing or signed with another key"
    )


def test_rogue_ca_certificate_is_refused(pki: Pki, insurer: DelegationVerifier) -> None:
    rogue = signer(pki, "rogue-insurer")  # names 'insurer', issued by another CA
    token = crafted(rogue)
    message = refused(insurer, token, peer_org="insurer")
    assert message.startswith(
        "delegation statement refused: the signer certificate was not issued by the federation "
        "CA (issuer "
    )
    assert message.endswith("only certificates of the federation are trusted")


def test_expired_certificate_is_refused(pki: Pki, insurer: DelegationVerifier) -> None:
    token = crafted(signer(pki, "expired-insurer"))
    message = refused(insurer, token, peer_org="insurer")
    assert message.startswith(
        "delegation statement refused: the signer certificate was not valid at "
    )


# -- organizations -----------------------------------------------------------------------------


def test_statement_of_c_over_connection_of_b_is_refused(
    pki: Pki, insurer: DelegationVerifier
) -> None:
    # A valid statement of mallory, relayed over hospital's authenticated connection.
    token = crafted(signer(pki, "mallory"))
    assert refused(insurer, token, PermissionDenied) == (
        "delegation statement refused: signed by organization 'mallory', expected 'hospital': "
        "only a gateway of 'hospital' may sign this (the connection is authenticated as "
        "'hospital'; a gateway may only vouch for its own requesters)"
    )


def test_certificate_of_b_carrying_issuer_c_is_refused(
    hospital: Signer, insurer: DelegationVerifier
) -> None:
    token = crafted(hospital, iss="mallory")
    assert refused(insurer, token, PermissionDenied) == (
        "delegation statement names issuer 'mallory', but it comes from organization 'hospital' "
        "(its certificate and this connection): a gateway may only speak for its own "
        "organization"
    )


def test_wrong_audience_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    token = statement(hospital, audience_org="lab")
    assert refused(insurer, token) == (
        "delegation statement is addressed to 'lab', not to this gateway's organization 'insurer'"
    )


# -- time, task and replay ---------------------------------------------------------------------


def test_expired_statement_is_refused(
    hospital: Signer, insurer: DelegationVerifier, clock: Clock
) -> None:
    token = statement(hospital)
    clock.now = segments(token)[1]["exp"] + 31
    message = refused(insurer, token)
    assert message == (
        "delegation statement of 'hospital' expired 31 s ago: the requesting gateway must send a "
        "fresh one (check both clocks if this repeats)"
    )


def test_clock_skew_is_tolerated(
    hospital: Signer, insurer: DelegationVerifier, clock: Clock
) -> None:
    token = statement(hospital)
    clock.now = segments(token)[1]["exp"] + 29
    assert insurer.verify(token, peer_org="hospital", task_id="task-1").subject == "dr-house"


def test_statement_from_the_future_is_refused(
    hospital: Signer, insurer: DelegationVerifier, clock: Clock
) -> None:
    clock.now = float(int(clock.now))
    now = int(clock.now)
    token = crafted(hospital, iat=now + 120, exp=now + 300)
    assert refused(insurer, token) == (
        "delegation statement of 'hospital' is issued 120 s in the future: check the clocks of "
        "both gateways"
    )


def test_lifetime_longer_than_allowed_is_refused(
    hospital: Signer, insurer: DelegationVerifier
) -> None:
    token = statement(hospital, ttl_seconds=3600)
    assert refused(insurer, token) == (
        "delegation statement of 'hospital' is valid for 3600 s, longer than the 900 s this "
        "gateway accepts"
    )


def test_task_mismatch_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    token = statement(hospital, task_id="task-1")
    assert refused(insurer, token, task_id="task-2") == (
        "delegation statement is for task 'task-1', not for task 'task-2'"
    )


def test_replay_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    token = statement(hospital)
    first = insurer.verify(token, peer_org="hospital", task_id="task-1")
    assert refused(insurer, token) == (
        f"delegation statement '{first.token_id}' of 'hospital' was already used (a replay): "
        "every task carries a fresh statement"
    )


async def test_concurrent_replays_let_exactly_one_through(
    hospital: Signer, insurer: DelegationVerifier
) -> None:
    token = statement(hospital)

    def attempt() -> bool:
        try:
            insurer.verify(token, peer_org="hospital", task_id="task-1")
        except Unauthenticated as exc:
            assert "was already used (a replay)" in exc.message
            return False
        return True

    results = await asyncio.gather(*(asyncio.to_thread(attempt) for _ in range(32)))
    assert results.count(True) == 1


def test_seen_statements_are_forgotten_once_expired(
    hospital: Signer, insurer: DelegationVerifier, clock: Clock
) -> None:
    for n in range(5):
        insurer.verify(statement(hospital, task_id=f"t{n}"), peer_org="hospital", task_id=f"t{n}")
    assert insurer.seen_count == 5
    clock.now += 300 + 31
    token = crafted(hospital, task_id="late", iat=int(clock.now), exp=int(clock.now) + 60)
    insurer.verify(token, peer_org="hospital", task_id="late")
    assert insurer.seen_count == 1


def test_replay_cache_is_bounded_and_fails_closed(pki: Pki, hospital: Signer, clock: Clock) -> None:
    verifier = DelegationVerifier(
        "insurer", Verifier.from_file(pki.ca), max_seen_per_peer=2, clock=clock
    )
    for n in range(2):
        verifier.verify(statement(hospital, task_id=f"t{n}"), peer_org="hospital", task_id=f"t{n}")
    with pytest.raises(ResourceExhausted) as caught:
        verifier.verify(statement(hospital, task_id="t2"), peer_org="hospital", task_id="t2")
    assert caught.value.message == (
        "organization 'hospital' sent too many delegation statements within their "
        "lifetime (limit 2): retry later"
    )
    clock.now += 400
    token = crafted(hospital, task_id="t3", iat=int(clock.now), exp=int(clock.now) + 60)
    verifier.verify(token, peer_org="hospital", task_id="t3")


# -- malformed statements ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "cause"),
    [
        ("", "no delegation statement came with the task"),
        ("a.b", "malformed delegation statement: a JWS has 3 parts separated by '.', got 2"),
        ("!!.e30.AA", "malformed delegation statement: its header is not base64url JSON"),
        ("e30.e30.!!", "malformed delegation statement: its signature is not base64url"),
        ("W10.e30.AA", "malformed delegation statement: its header is not an object"),
        ("x" * 20_000, "malformed delegation statement: longer than 16384 bytes"),
    ],
)
def test_malformed_statements_are_refused(
    insurer: DelegationVerifier, token: str, cause: str
) -> None:
    assert refused(insurer, token) == cause


def test_missing_or_extra_certificates_are_refused(
    pki: Pki, hospital: Signer, insurer: DelegationVerifier
) -> None:
    cert = base64.b64encode(hospital.cert_der).decode()
    for x5c in (None, [], [cert, cert], "not-a-list"):
        assert refused(insurer, crafted(hospital, header={"x5c": x5c})) == (
            "malformed delegation statement: header 'x5c' must hold exactly the signing "
            "gateway's certificate"
        )
    assert refused(insurer, crafted(hospital, header={"x5c": ["AAAA"]})) == (
        "malformed delegation statement: header 'x5c' is not a base64 DER certificate"
    )


def test_other_statement_type_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    token = crafted(hospital, header={"typ": "fedgate-participant+jwt"})
    assert refused(insurer, token) == (
        "not a delegation statement (type 'fedgate-participant+jwt', expected "
        "'fedgate-delegation+jwt')"
    )


def test_short_signature_is_refused(hospital: Signer, insurer: DelegationVerifier) -> None:
    header, payload, _ = statement(hospital).split(".")
    assert refused(insurer, f"{header}.{payload}.{b64url(b'x' * 63)}") == (
        "malformed delegation statement: an ES256 signature is 64 bytes, got 63"
    )


@pytest.mark.parametrize(
    ("claims", "cause"),
    [
        ({"sub": ""}, "delegation subject is empty"),
        ({"sub": 7}, "delegation subject must be a string"),
        ({"roles": "admin"}, "delegation roles must be a list of non-empty strings"),
        ({"jti": None}, "delegation id (jti) must be a string"),
        ({"exp": "soon"}, "'exp' is not a time in epoch seconds"),
    ],
)
def test_malformed_claims_are_refused(
    hospital: Signer, insurer: DelegationVerifier, claims: dict[str, Any], cause: str
) -> None:
    message = refused(insurer, crafted(hospital, **claims))
    assert message == f"malformed delegation statement: {cause}"


NOT_JSON = "malformed delegation statement: its payload is not base64url JSON"
NOT_A_TIME = "malformed delegation statement: 'exp' is not a time in epoch seconds"


@pytest.mark.parametrize(
    ("exp", "cause"),
    [
        ("NaN", NOT_JSON),
        ("Infinity", NOT_JSON),
        ("-Infinity", NOT_JSON),
        ("1e400", NOT_A_TIME),
        ("-5", NOT_A_TIME),
        (str(10**400), NOT_A_TIME),
        ("true", NOT_A_TIME),
    ],
)
def test_non_finite_or_absurd_times_are_refused(
    hospital: Signer, insurer: DelegationVerifier, exp: str, cause: str
) -> None:
    # NaN would compare false everywhere and stick at the head of the replay cache.
    token = crafted(hospital, exp=0)
    header = token.split(".")[0]
    text = json.dumps(segments(token)[1]).replace('"exp": 0', f'"exp": {exp}')
    forged = _sign_jws_raw(hospital, f"{header}.{b64url(text.encode())}")
    assert refused(insurer, forged) == cause


def _sign_jws_raw(signer: Signer, signing_input: str) -> str:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(signer.sign(signing_input.encode()))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_deeply_nested_json_is_refused(insurer: DelegationVerifier) -> None:
    token = f"{b64url(b'[' * 10_000)}.e30.AA"
    assert refused(insurer, token) == (
        "malformed delegation statement: its header is not base64url JSON"
    )


def test_one_peer_filling_its_replay_share_does_not_lock_out_another(
    pki: Pki, hospital: Signer, clock: Clock
) -> None:
    verifier = DelegationVerifier(
        "insurer", Verifier.from_file(pki.ca), max_seen_per_peer=2, clock=clock
    )
    for n in range(2):
        verifier.verify(statement(hospital, task_id=f"t{n}"), peer_org="hospital", task_id=f"t{n}")
    with pytest.raises(ResourceExhausted):
        verifier.verify(statement(hospital, task_id="t2"), peer_org="hospital", task_id="t2")
    lab = signer(pki, "lab")
    verifier.verify(crafted(lab), peer_org="lab", task_id="task-1")


def test_remembered_certificate_still_refuses_everything(
    pki: Pki, hospital: Signer, insurer: DelegationVerifier, clock: Clock
) -> None:
    """After hospital's certificate passed once, the fast path refuses what the full check does."""
    insurer.verify(statement(hospital), peer_org="hospital", task_id="task-1")
    assert insurer._verifier._issued_by_ca == {(hospital.cert_der, 0)}
    header, _, signature = statement(hospital).split(".")
    claims = segments(statement(hospital))[1]
    claims["roles"] = ["admin"]
    tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    assert refused(insurer, tampered).endswith(
        "the signature of 'hospital' does not verify: "
        "the signed content was changed after signing "
        "or signed with another key"
    )
    forged = crafted(signer(pki, "mallory"), cert_of=hospital, iss="hospital")
    assert "the signature of 'hospital' does not verify" in refused(insurer, forged)
    # hospital's certificate over a connection authenticated as lab.
    assert refused(insurer, statement(hospital), PermissionDenied, peer_org="lab").startswith(
        "delegation statement refused: signed by organization 'hospital', expected 'lab'"
    )
    clock.now += 900 * 86_400  # past the end of the certificate
    now = int(clock.now)
    late = crafted(hospital, iat=now, exp=now + 60)
    assert refused(insurer, late).startswith(
        "delegation statement refused: the signer certificate was not valid at "
    )


def test_ca_rotation_drops_remembered_certificates_at_once(
    pki: Pki, hospital: Signer, insurer: DelegationVerifier
) -> None:
    """A certificate accepted before the CA set is rotated away from its CA is refused after."""
    insurer.verify(statement(hospital), peer_org="hospital", task_id="task-1")
    federation_ca = load_cert(pki.ca.read_bytes())
    insurer._verifier.trust([load_cert((pki.root / "rogue-ca.crt").read_bytes())])
    assert refused(insurer, statement(hospital)).startswith(
        "delegation statement refused: the signer certificate was not issued by the federation "
        "CA (issuer "
    )
    insurer._verifier.trust([federation_ca])
    insurer.verify(statement(hospital), peer_org="hospital", task_id="task-1")


def test_rotated_own_certificate_signs_with_its_own_header(
    tmp_path: Path, pki: Pki, hospital: Signer, insurer: DelegationVerifier
) -> None:
    """Statements issued after the gateway's certificate is rotated carry the new certificate."""
    insurer.verify(statement(hospital), peer_org="hospital", task_id="task-1")
    write_pair(issue_gateway_cert(ca_pair(pki), "hospital"), tmp_path / "h.crt", tmp_path / "h.key")
    rotated = Signer.from_files(tmp_path / "h.crt", tmp_path / "h.key")
    token = statement(rotated)
    assert base64.b64decode(segments(token)[0]["x5c"][0]) == rotated.cert_der != hospital.cert_der
    insurer.verify(token, peer_org="hospital", task_id="task-1")
    old = statement(hospital)
    assert base64.b64decode(segments(old)[0]["x5c"][0]) == hospital.cert_der
    insurer.verify(old, peer_org="hospital", task_id="task-1")
