"""The delegation statement carries the requester's audit chain position (claims chs, chh)."""

from __future__ import annotations

import time

import pytest

from gateway.errors import InvalidArgument, Unauthenticated
from gateway.identity.delegation import (
    DelegationVerifier,
    _header_segment,
    _sign_jws,
    issue_delegation,
)

HEAD = "ef" * 32


def _verifier(audit_pki) -> DelegationVerifier:
    return DelegationVerifier("beta", audit_pki.verifier())


def test_chain_position_travels_in_the_signed_statement(audit_pki) -> None:
    token = issue_delegation(
        audit_pki.signer("alpha"),
        audience_org="beta",
        subject="nurse",
        task_id="t-1",
        chain_sequence=41,
        chain_head=HEAD,
    )
    delegation = _verifier(audit_pki).verify(token, peer_org="alpha", task_id="t-1")
    assert (delegation.chain_sequence, delegation.chain_head) == (41, HEAD)


def test_a_statement_without_chain_position_still_verifies(audit_pki) -> None:
    token = issue_delegation(
        audit_pki.signer("alpha"), audience_org="beta", subject="nurse", task_id="t-1"
    )
    delegation = _verifier(audit_pki).verify(token, peer_org="alpha", task_id="t-1")
    assert (delegation.chain_sequence, delegation.chain_head) == (None, None)


@pytest.mark.parametrize(
    ("sequence", "head"), [(41, None), (None, HEAD), (-1, HEAD), (41, "EF" * 32), (2**60, HEAD)]
)
def test_issuing_a_malformed_chain_position_is_refused(audit_pki, sequence, head) -> None:
    with pytest.raises(InvalidArgument, match="'chs' is a sequence"):
        issue_delegation(
            audit_pki.signer("alpha"),
            audience_org="beta",
            subject="nurse",
            task_id="t-1",
            chain_sequence=sequence,
            chain_head=head,
        )


@pytest.mark.parametrize(
    "claims", [{"chs": "41", "chh": HEAD}, {"chs": 41}, {"chh": HEAD}, {"chs": True, "chh": HEAD}]
)
def test_a_received_malformed_chain_position_is_refused(audit_pki, claims) -> None:
    signer = audit_pki.signer("alpha")
    now = int(time.time())
    payload = {
        "iss": "alpha",
        "aud": "beta",
        "sub": "nurse",
        "roles": [],
        "purpose": "",
        "task_id": "t-1",
        "jti": "j-" + str(sorted(claims)),
        "iat": now,
        "exp": now + 60,
        **claims,
    }
    token = _sign_jws(signer, _header_segment(signer.cert_der), payload)
    with pytest.raises(Unauthenticated, match="malformed delegation statement: .*'chs'"):
        _verifier(audit_pki).verify(token, peer_org="alpha", task_id="t-1")
