"""Issue 11 #4: no partner can fill the audit store (and so make the gateway fail closed for all).

Attacks from outside, with raw fedgate.v1 stubs and real certificates: a peer flooding every
Federation RPC, a federation member that is not a peer, malformed and oversized requests, and a
flood of ever-higher signed checkpoints. Each costs bounded storage and still shows in the log.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fedgate.v1 import fedgate_pb2 as pb

from gateway.audit.chain import AuditRecord
from gateway.edges.wire import checkpoint_from_pb, checkpoint_to_pb
from gateway.identity.signing import SignedCheckpoint, Signer, sign_checkpoint, verify_checkpoint
from gateway.local import LocalFederation
from tests.conftest import Pki
from tests.integration.federation import HOSPITAL_RULES, echo_agent, org_config, serving
from tests.security.conftest import hospital_tokens
from tests.security.raw import (
    federation_client,
    raw_federation_call,
    refusal,
    stream_refusal,
    task_request,
)

# The refusal log's sampling (gateway.exchange.refusals): full records per source, status, window.
FULL_PER_WINDOW = 10
AGGREGATE = re.compile(r"^(\d+) more refusals \((\w+)\)")


def lab_signer(pki: Pki) -> Signer:
    return Signer.from_files(pki.cert("lab"), pki.key("lab"))


def signed_head(pki: Pki, sequence: int, head_hash: str | None = None) -> pb.SignedCheckpoint:
    """lab's head, signed with its real key: of any shape (our own signer refuses to sign a
    malformed one, a partner acting in bad faith does not)."""
    lab = lab_signer(pki)
    unsigned = SignedCheckpoint(
        "lab", sequence, head_hash or f"{sequence:064x}", int(time.time() * 1000), b"", b""
    )
    return checkpoint_to_pb(
        SignedCheckpoint(
            unsigned.org,
            unsigned.sequence,
            unsigned.head_hash,
            unsigned.signed_at_unix_ms,
            lab.cert_der,
            lab.sign(unsigned.signed_bytes()),
        )
    )


async def flush_refusals(fed: LocalFederation) -> None:
    """Write the aggregate records of open windows now (a gateway does so at the latest on stop)."""
    from gateway.exchange.refusals import RefusalLog

    await RefusalLog.for_store(fed["hospital"].audit).flush()


def refusals_of(fed: LocalFederation, peer: str) -> list[AuditRecord]:
    return fed["hospital"].audit.query(peer=peer, kind="rejected", limit=100_000)


def counted(records: list[AuditRecord]) -> Counter[str]:
    """Refusals per status, as the records tell: one each in full, N in an aggregate record."""
    total: Counter[str] = Counter()
    for record in records:
        match = AGGREGATE.match(record.detail)
        total[record.status] += int(match.group(1)) if match else 1
    return total


async def test_every_federation_rpc_spends_the_peers_rate(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """An RPC that bypassed the limiter could never answer RESOURCE_EXHAUSTED: each one does."""
    exhausted: dict[str, int] = {}
    async with federation_client(pki, secure_fed, "lab") as lab:
        calls = {
            "ListAgents": lambda n: lab.ListAgents(pb.ListAgentsRequest(), timeout=5),
            "GetTask": lambda n: lab.GetTask(pb.GetTaskRequest(task_id=f"g-{n}"), timeout=5),
            "CancelTask": lambda n: lab.CancelTask(
                pb.CancelTaskRequest(task_id=f"c-{n}"), timeout=5
            ),
            "ExchangeCheckpoint": lambda n: lab.ExchangeCheckpoint(
                signed_head(pki, n + 1), timeout=5
            ),
            "SubmitTask": lambda n: lab.SubmitTask(task_request(pki, "lab", f"s-{n}"), timeout=5),
        }
        for name, call in calls.items():
            outcomes = await asyncio.gather(*(refusal_or_ok(call(n)) for n in range(30)))
            exhausted[name] = outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        streams = await asyncio.gather(
            *(
                stream_refusal(lab.StreamTask(task_request(pki, "lab", f"t-{n}"), timeout=5))
                for n in range(30)
            )
        )
        exhausted["StreamTask"] = sum(
            1
            for _, error in streams
            if error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        error = await refusal(lab.ListAgents(pb.ListAgentsRequest(), timeout=5))
    assert all(exhausted.values()), exhausted
    assert "organization 'lab' exceeded its rate of 5 requests/s" in (error.details() or "")
    # The other peer has its own bucket: served as before.
    async with federation_client(pki, secure_fed, "insurer") as insurer:
        assert isinstance(
            await insurer.ListAgents(pb.ListAgentsRequest(), timeout=5), pb.ListAgentsResponse
        )


async def refusal_or_ok(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_member_that_is_not_a_peer_is_refused_at_a_bounded_storage_cost(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """mallory holds a valid federation certificate but is no peer of hospital: every call is
    refused, under a per-certificate rate, and 300 refusals cost a handful of records that still
    count all 300."""
    async with federation_client(pki, secure_fed, "mallory") as mallory:
        calls = [
            mallory.SubmitTask(task_request(pki, "mallory", f"m-{n}"), timeout=5)
            for n in range(200)
        ]
        calls += [mallory.ListAgents(pb.ListAgentsRequest(), timeout=5) for _ in range(50)]
        calls += [mallory.ExchangeCheckpoint(signed_head(pki, 1), timeout=5) for _ in range(50)]
        outcomes = Counter(await asyncio.gather(*(refusal_or_ok(c) for c in calls)))
    assert set(outcomes) == {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert outcomes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 200, "past its burst, mallory is limited"
    before_flush = refusals_of(secure_fed, "mallory")
    # Per status (refused, limited): the first FULL_PER_WINDOW in full, the rest counted.
    assert len(before_flush) <= 2 * FULL_PER_WINDOW, len(before_flush)
    await flush_refusals(secure_fed)
    records = refusals_of(secure_fed, "mallory")
    assert len(records) <= 2 * (FULL_PER_WINDOW + 1)
    assert sum(counted(records).values()) == 300, "the flood still shows, with its size"
    aggregate = next(r for r in records if AGGREGATE.match(r.detail))
    assert "the certificate sha256:" in aggregate.detail and "'mallory'" in aggregate.detail
    assert secure_fed["hospital"].audit.peer_checkpoints("mallory") == []


async def test_a_flooding_peer_costs_bounded_storage_and_still_shows(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    async with federation_client(pki, secure_fed, "lab") as lab:
        outcomes = Counter(
            await asyncio.gather(
                *(
                    refusal_or_ok(
                        lab.SubmitTask(task_request(pki, "lab", f"r-{n}", agent="nope"), timeout=5)
                    )
                    for n in range(300)
                )
            )
        )
    limited = outcomes[grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert limited > 250
    await flush_refusals(secure_fed)
    records = refusals_of(secure_fed, "lab")
    assert len(records) <= FULL_PER_WINDOW + 1, len(records)
    assert counted(records)["RESOURCE_EXHAUSTED"] == limited


async def test_malformed_requests_spend_the_rate_and_cost_bounded_storage(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    """Undecodable bytes used to be refused before the limiter and recorded one by one."""
    async with raw_federation_call(pki, secure_fed, "lab", "SubmitTask") as raw:
        undecodable = [raw(b"\x0a\x02\xff\xfe", timeout=5) for _ in range(200)]
        outcomes = Counter(await asyncio.gather(*(refusal_or_ok(c) for c in undecodable)))
    assert outcomes[grpc.StatusCode.INVALID_ARGUMENT] >= 1
    assert outcomes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 150
    await flush_refusals(secure_fed)
    records = refusals_of(secure_fed, "lab")
    assert len(records) <= 2 * (FULL_PER_WINDOW + 1), len(records)
    assert sum(counted(records).values()) == 200


@pytest.mark.parametrize(
    ("actions", "cause"),
    [
        (
            [pb.FieldAction(path=f"items[{n}].price", action=1) for n in range(5_000)],
            "more than the 1000",
        ),
        ([pb.FieldAction(path="a" * 10_000, action=1)], "longer than 512 characters"),
        ([pb.FieldAction(path="patient..name", action=1)], "is not a field path"),
        ([pb.FieldAction(path="patient.name", action=99)], "unknown action kind 99"),
        ([pb.FieldAction(path="patient.na\x00me", action=1)], "NUL character"),
    ],
    ids=["too-many", "too-long", "bad-syntax", "unknown-kind", "nul"],
)
async def test_a_peers_input_field_actions_are_validated_and_bounded(
    secure_fed: LocalFederation, pki: Pki, actions: list[pb.FieldAction], cause: str
) -> None:
    """What a peer says it withheld goes into our record of its request: never unbounded."""
    token = hospital_tokens(secure_fed).issue("echo", agents=["echo"])
    async with (
        serving(secure_fed.participant("hospital"), echo_agent(), token=token),
        federation_client(pki, secure_fed, "lab") as lab,
    ):
        request = task_request(pki, "lab", "fa-1", input_field_actions=actions)
        error = await refusal(lab.SubmitTask(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input_field_actions" in (error.details() or "") and cause in (error.details() or "")
    (record,) = secure_fed["hospital"].audit.query(task_id="fa-1")
    assert record.kind == "rejected" and record.withheld_paths == ()
    assert len(record.detail) <= 1000


@pytest.mark.parametrize(
    ("sequence", "head_hash", "cause"),
    [
        (5, "ABCDEF" * 10 + "ABCD", "64 lowercase hex digits"),
        (5, "ab" * 31, "64 lowercase hex digits"),
        (5, "zz" * 32, "64 lowercase hex digits"),
        (-1, "ab" * 32, "out of range"),
        (2**62, "ab" * 32, "out of range"),
    ],
    ids=["uppercase", "short", "not-hex", "negative", "beyond-2^53"],
)
async def test_a_signed_checkpoint_of_the_wrong_shape_is_refused_and_not_stored(
    secure_fed: LocalFederation, pki: Pki, sequence: int, head_hash: str, cause: str
) -> None:
    """Signed by the peer's real key, so the signature alone would let it in (and a head at 2^62
    would lock the peer's every later checkpoint out as 'behind')."""
    async with federation_client(pki, secure_fed, "lab") as lab:
        error = await refusal(
            lab.ExchangeCheckpoint(signed_head(pki, sequence, head_hash), timeout=5)
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cause in (error.details() or "")
    assert secure_fed["hospital"].audit.peer_checkpoints("lab") == []
    (record,) = refusals_of(secure_fed, "lab")
    assert record.status == "INVALID_ARGUMENT" and "checkpoint" in record.detail


async def test_a_checkpoint_with_a_huge_certificate_or_from_the_future_is_refused(
    secure_fed: LocalFederation, pki: Pki
) -> None:
    lab = lab_signer(pki)
    huge = checkpoint_to_pb(sign_checkpoint(lab, 3, "ab" * 32))
    huge.signer_certificate = huge.signer_certificate * 200
    ahead = SignedCheckpoint("lab", 3, "ab" * 32, int((time.time() + 86_400) * 1000), b"", b"")
    future = SignedCheckpoint(
        "lab", 3, "ab" * 32, ahead.signed_at_unix_ms, lab.cert_der, lab.sign(ahead.signed_bytes())
    )
    async with federation_client(pki, secure_fed, "lab") as client:
        too_big = await refusal(client.ExchangeCheckpoint(huge, timeout=5))
        dated = await refusal(client.ExchangeCheckpoint(checkpoint_to_pb(future), timeout=5))
        other = await refusal(
            client.ExchangeCheckpoint(
                checkpoint_to_pb(
                    sign_checkpoint(
                        Signer.from_files(pki.cert("insurer"), pki.key("insurer")), 3, "ab" * 32
                    )
                ),
                timeout=5,
            )
        )
    assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signer_certificate must hold a DER certificate of at most 8192 bytes" in (
        too_big.details() or ""
    )
    assert dated.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in the future" in (dated.details() or "")
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "checkpoint names organization 'insurer' but the caller is 'lab'" in (
        other.details() or ""
    )
    assert secure_fed["hospital"].audit.peer_checkpoints() == []


@pytest.fixture
async def open_fed(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalFederation]:
    """hospital with limits high enough that a checkpoint flood reaches the checkpoint gate."""
    extra = "[limits]\npeer_rate_per_second = 100000\npeer_burst = 100000\n"
    paths = [
        org_config(tmp_path, pki, "hospital", HOSPITAL_RULES, ["insurer", "lab"], extra=extra),
        org_config(tmp_path, pki, "lab", "", ["hospital"]),
    ]
    async with LocalFederation(paths) as federation:
        yield federation


async def test_a_checkpoint_flood_is_answered_from_memory(
    open_fed: LocalFederation, pki: Pki
) -> None:
    """200 ever-higher signed heads: one kept, one of ours signed; each answer is our signed head.
    A head that then goes back is refused, and the head it went back from is kept as evidence."""
    hospital = open_fed["hospital"]
    async with federation_client(pki, open_fed, "lab") as lab:
        answers = [
            await lab.ExchangeCheckpoint(signed_head(pki, 100 + n), timeout=5) for n in range(200)
        ]
        went_back = await refusal(lab.ExchangeCheckpoint(signed_head(pki, 150), timeout=5))
    for answer in answers:
        ours = checkpoint_from_pb(answer)
        verify_checkpoint(hospital.router.verifier, ours)
        assert ours.org == "hospital"
    assert [c.sequence for c in hospital.audit.peer_checkpoints("lab")] == [100, 299]
    assert len(hospital.audit.own_checkpoints()) == 1, "signed once: the chain did not move"
    assert went_back.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "signed head 150, behind or diverging from its earlier signed head 299" in (
        went_back.details() or ""
    )
