"""CPU per exchange, step by step: what one gateway spends on each step, measured in isolation.

    python -m bench.bench_steps [--quick]

Every step is the project's own code on realistic inputs, in this process, on this machine:
bench_exchange's 20-field REQUEST and RESULT under its rules plus 1,000 filler rules per side (as
the full bench runs them), at about 1 KB (the 20 fields), 64 KB and 1 MiB (the same fields and a
"blob" string, under the skill `big` whose rules let it through), with a throwaway PKI for alpha
(the requester's gateway) and beta (the responder's). The rows follow an exchange in order:

    requester gateway  decode the SDK's TaskRequest, verify the participant token, send filter,
                       digests, issue the delegation statement, encode for the peer, open record;
                       decode the peer's TaskResult, verify the receipt, digest, close record,
                       encode for the SDK
    responder gateway  decode the peer's request, verify the delegation statement, invoke policy
                       and limits, digest, open record, encode the agent's assignment, decode the
                       agent's result, share filter, digests, sign the receipt, close record,
                       encode for the peer
    both               gRPC: one grpc.aio unary call over mTLS on loopback, client and server in
                       this process, with the bytes of the federation hop (a relay hop's work)

Each step calls what the gateway calls at that point (gateway.exchange.steps.Steps composes them),
with the same arguments: Policy.filter as Steps.filter does, issue_delegation as
Steps.delegation_for, sign_result and verify_receipt as Steps.release and Steps.receive, the
servicers' decoding (grpc's FromString, then gateway.edges.wire). Steps.digests itself runs on a
stand-in holding only its digest key; the audit events are built as Steps.event builds them.

A synchronous step is timed timeit-style: time.process_time around a loop (garbage collection
off, as timeit does), the loop long enough for a stable figure, the minimum of a few rounds. A
store step (an audit record and its task-table write in one transaction: SqlAuditStore.write with
Accept or Finish) is the process CPU (writer thread included) per step with 32 concurrent writers
on durable SQLite (WAL, synchronous=FULL: fsync as the gateway runs it) in a temporary folder.
The gRPC row is the process CPU per call at 32 in flight, both ends counted; it counts once in
each gateway's total (a gateway serves one call and makes one, as a relay hop does).

The share filter is measured again at 13 (the exchange's own rules), 1,013 and 10,000 rules
(bench.bench_policy holds the flatness target, on its own payload). What the full bench measures
per gateway (bench.bench_exchange, CPU per exchange at 32 in flight) minus the sum here is
orchestration: the event loop, tasks, queues and futures, grpc's callbacks and the agent's stream,
which no step owns. `python -m bench` runs the full bench first and prints that difference here.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import re
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from fedgate.v1 import fedgate_pb2 as pb

from bench import bench_exchange as bx
from bench import relay
from gateway.audit.store import AuditEvent, open_store
from gateway.edges.wire import (
    result_from_pb,
    result_to_pb,
    spec_from_pb,
    spec_to_pb,
    update_from_pb,
)
from gateway.exchange.steps import Limits, Steps
from gateway.exchange.tasks import TaskResult, TaskSpec, TaskState
from gateway.identity.certs import org_dns_name
from gateway.identity.delegation import Delegation, DelegationVerifier, issue_delegation
from gateway.identity.signing import (
    SignedReceipt,
    Signer,
    Verifier,
    sign_result,
    verify_receipt,
)
from gateway.identity.tokens import TokenAuthority, TokenClaims
from gateway.payload import canonical_bytes, check_limits, digest
from gateway.policy.engine import FilterResult, Policy, load_policy
from gateway.store.task_table import Accept, Finish, TaskOp, task_key

REQUESTER_ORG, RESPONDER_ORG, AGENT = bx.REQUESTER_ORG, bx.RESPONDER_ORG, bx.AGENT
SIZES: tuple[tuple[str, int], ...] = (("1 KB", 0), ("64 KB", 64 * 1024), ("1 MiB", 1024 * 1024))
FILLER = 1_000  # filler rules per gateway, as the full bench runs
RULE_FILLERS = (0, 1_000, 10_085)  # the share filter at 13, 1,013 and 10,000 rules (distinct)
WRITERS = 32  # concurrent store writers, and gRPC calls in flight
LIMITS = Limits()  # the gateway's default payload limits ([limits] max_payload_depth / _fields)
DEFAULT_DEADLINE, MAX_DEADLINE = 30.0, 600.0  # [gateway] defaults
TIME_REMAINING = 120.0  # what grpc says is left of the call (the SDK's timeout)
# A committed audit head, as a store reports it: the delegation statement and receipt carry it.
CHAIN_HEAD = (12_345, "ab" * 32)

# The rows, in the order of an exchange: (gateway, what the row shows, how it is measured: the
# Exchange method, or the store step). The smoke test checks that each is printed.
ROWS: tuple[tuple[str, str, str], ...] = (
    (REQUESTER_ORG, "decode the SDK's request (bytes -> TaskSpec)", "decode_sdk_request"),
    (REQUESTER_ORG, "participant token: verify, authorize the call", "verify_token"),
    (REQUESTER_ORG, "send policy filter", "send_filter"),
    (REQUESTER_ORG, "digests + canonical bytes of the request", "request_digests"),
    (REQUESTER_ORG, "delegation statement: issue (ES256 sign)", "issue_delegation"),
    (REQUESTER_ORG, "store: open (request_sent + accept)", "store:open"),
    (REQUESTER_ORG, "encode the request for the peer (-> bytes)", "encode_for_peer"),
    (REQUESTER_ORG, "decode the peer's result (bytes -> TaskResult)", "decode_peer_result"),
    (REQUESTER_ORG, "receipt: verify (ES256 verify, commitment)", "verify_receipt"),
    (REQUESTER_ORG, "limits + digest of the result received", "result_received_digest"),
    (REQUESTER_ORG, "store: close (result_received + finish)", "store:close"),
    (REQUESTER_ORG, "encode the result for the SDK (-> bytes)", "encode_for_sdk"),
    (RESPONDER_ORG, "decode the peer's request (bytes -> TaskSpec)", "decode_peer_request"),
    (RESPONDER_ORG, "delegation statement: verify (ES256, replay cache)", "verify_delegation"),
    (RESPONDER_ORG, "invoke policy + payload limits", "admit"),
    (RESPONDER_ORG, "digest of the request received", "request_received_digest"),
    (RESPONDER_ORG, "store: open (request_received + accept, input kept)", "store:open"),
    (RESPONDER_ORG, "encode the assignment for the agent (-> bytes)", "encode_assignment"),
    (RESPONDER_ORG, "decode the agent's result (bytes -> TaskResult)", "decode_agent_result"),
    (RESPONDER_ORG, "share policy filter", "share_filter"),
    (RESPONDER_ORG, "digests + canonical bytes of the result", "result_digests"),
    (RESPONDER_ORG, "receipt: sign (ES256 sign, commitment)", "sign_receipt"),
    (RESPONDER_ORG, "store: close (result_released + finish)", "store:close"),
    (RESPONDER_ORG, "encode the result for the peer (-> bytes)", "encode_for_requester"),
)
REQUESTER_STEPS = tuple(name for org, name, _ in ROWS if org == REQUESTER_ORG)
RESPONDER_STEPS = tuple(name for org, name, _ in ROWS if org == RESPONDER_ORG)
STORE_STEPS = {
    (org, how.removeprefix("store:")): name for org, name, how in ROWS if how.startswith("store:")
}
GRPC_STEP = "gRPC: one unary call over mTLS, both ends"
REQUESTER_TOTAL = "total, requester gateway (its steps + gRPC)"
RESPONDER_TOTAL = "total, responder gateway (its steps + gRPC)"


# ---- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    mode: str
    round_seconds: float  # the least CPU time of one timed loop of a synchronous step
    rounds: int  # timed loops per step; the minimum is reported
    store_steps: tuple[int, ...]  # store steps of each kind per round, per payload size
    grpc_calls: tuple[int, ...]  # gRPC calls per round, per payload size
    async_rounds: int  # rounds of store steps and gRPC calls


SETTINGS = {
    "full": Settings(
        "full",
        round_seconds=0.015,
        rounds=7,
        store_steps=(512, 192, 64),
        grpc_calls=(2048, 512, 64),
        async_rounds=3,
    ),
    "quick": Settings(
        "quick",
        round_seconds=0.002,
        rounds=3,
        store_steps=(64, 32, 32),
        grpc_calls=(128, 64, 32),
        async_rounds=1,
    ),
}


# ---- inputs --------------------------------------------------------------------------------


def payloads(size: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(skill, request input, agent output) of about `size` bytes of canonical JSON each; 0 is
    the 20 fields alone (skill `summary`), more adds a "blob" string (skill `big`)."""
    if not size:
        return "summary", dict(bx.REQUEST), dict(bx.RESULT)

    def padded(base: dict[str, Any]) -> dict[str, Any]:
        room = size - len(canonical_bytes(base)) - len(',"blob":""')
        return {**base, "blob": "x" * max(0, room)}

    return "big", padded(bx.REQUEST), padded(bx.RESULT)


class _DigestKeyOnly:
    """Steps.digests reads nothing of its Steps but the digest key: it is called on this."""

    def __init__(self, key: bytes) -> None:
        self.digest_key = key


@dataclass
class Gateways:
    """What the two gateways hold: keys, policies, the token authority, the replay cache."""

    pki: bx.Pki
    signer: dict[str, Signer]
    verifier: dict[str, Verifier]
    policy: dict[str, Policy]
    tokens: TokenAuthority
    token: str
    delegations: DelegationVerifier
    digest_key: dict[str, _DigestKeyOnly]

    @classmethod
    def create(cls, folder: Path) -> Gateways:
        pki = bx.make_pki(folder / "pki")
        orgs = (REQUESTER_ORG, RESPONDER_ORG)
        tokens = TokenAuthority(
            REQUESTER_ORG, folder / "tokens" / "token.key", folder / "tokens" / "revocations.json"
        )
        verifier = {org: Verifier.from_file(pki.ca) for org in orgs}
        return cls(
            pki=pki,
            signer={org: Signer.from_files(pki.cert[org], pki.key[org]) for org in orgs},
            verifier=verifier,
            policy={
                REQUESTER_ORG: load_rules(folder, REQUESTER_ORG, FILLER),
                RESPONDER_ORG: load_rules(folder, RESPONDER_ORG, FILLER),
            },
            tokens=tokens,
            token=tokens.issue(
                "bench-requester", calls=[f"{RESPONDER_ORG}/{AGENT}"], ttl_seconds=3600
            ),
            delegations=DelegationVerifier(RESPONDER_ORG, verifier[RESPONDER_ORG]),
            digest_key={org: _DigestKeyOnly(bytes([i + 1]) * 32) for i, org in enumerate(orgs)},
        )


def load_rules(folder: Path, org: str, filler: int) -> Policy:
    """A gateway's policy as bench_exchange writes it: the exchange's rules and `filler` more."""
    if org == REQUESTER_ORG:
        relevant, peer, salt = bx.REQUESTER_RULES, RESPONDER_ORG, 0
    else:
        relevant, peer, salt = bx.RESPONDER_RULES, REQUESTER_ORG, 1
    path = folder / f"{org}-{filler}.csv"
    path.write_text(bx.rules_csv(relevant, filler, peer, salt))
    return load_policy(bx.MODEL, path, pseudonym_key=bytes(range(32)))


def share_filter(
    policy: Policy, skill: str, output: dict[str, Any], claims: dict[str, Any]
) -> FilterResult:
    """Steps.filter in release: beta's share policy for alpha, under the delegated claims."""
    return policy.filter(
        REQUESTER_ORG,
        AGENT,
        skill,
        "share",
        output,
        claims,
        max_depth=LIMITS.max_depth,
        max_fields=LIMITS.max_fields,
    )


def _event(kind: str, spec: TaskSpec, peer: str, **fields: Any) -> AuditEvent:
    """An audit event as Steps.event builds it."""
    return AuditEvent(
        kind=kind,
        task_id=spec.task_id,
        peer_org=peer,
        agent=spec.agent,
        skill=spec.skill,
        requester=spec.requester,
        **fields,
    )


def _actions(filtered: FilterResult) -> tuple[tuple[str, str], ...]:
    """A filter's field actions, as a request or result carries them."""
    return tuple((p, "withheld") for p in filtered.withheld) + filtered.transformed


def _split(actions: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Field actions received, as a record keeps them (withheld paths, transformed ones)."""
    return {
        "withheld_paths": tuple(p for p, a in actions if a == "withheld"),
        "transformed": tuple((p, a) for p, a in actions if a != "withheld"),
    }


# A store step: its audit event, the task it writes and (for a finish) the task's result.
Record = tuple[AuditEvent, TaskSpec, TaskResult | None]


class Exchange:
    """One exchange at one payload size. Each step is a method doing what the gateway does at
    that point; the constructor runs them all once, in order, so that each has its real input,
    and keeps what the stores would write. The bench then times each method on its own."""

    def __init__(self, gw: Gateways, size: int) -> None:
        self.gw = gw
        self.skill, self.request_input, self.agent_output = payloads(size)
        alpha, beta = REQUESTER_ORG, RESPONDER_ORG
        # alpha: the SDK's call.
        self.sdk_request = bx._request_pb(self.skill, self.request_input).SerializeToString()
        spec = self.decode_sdk_request()
        self.spec = spec = replace(spec, requester=f"{self.verify_token().subject}/bench")
        self.sent = sent = self.send_filter()
        before, after, _ = self.request_digests()
        self.outbound = replace(
            spec.with_input(sent.output, _actions(sent)),
            delegation=self.issue_delegation(),
            purpose="",
            roles=(),
        )
        self.peer_request = self.encode_for_peer()
        self.records: dict[tuple[str, str], Record] = {}
        self.records[alpha, "open"] = (
            _event(
                "request_sent",
                spec,
                beta,
                direction="outbound",
                decision="partial",
                status=TaskState.SUBMITTED.value,
                withheld_paths=sent.withheld,
                transformed=sent.transformed,
                digest_before=before,
                digest_after=after,
                policy_version=sent.policy_version,
            ),
            spec,
            None,
        )
        # beta: the peer's call, admitted.
        inbound = self.decode_peer_request()
        statement = self.verify_delegation(inbound.delegation)
        self.inbound = inbound = replace(
            inbound, requester=statement.subject, purpose=statement.purpose, roles=statement.roles
        )
        self.claims: dict[str, Any] = statement.claims()
        self.admit()
        input_digest = self.request_received_digest()
        self.records[beta, "open"] = (
            _event(
                "request_received",
                inbound,
                alpha,
                direction="inbound",
                decision="allowed",
                status=TaskState.SUBMITTED.value,
                **_split(inbound.input_field_actions),
                digest_before=input_digest,
                digest_after=input_digest,
                policy_version=gw.policy[beta].version,
                evidence={"delegation": inbound.delegation},
            ),
            inbound,
            None,
        )
        # The agent's answer to its assignment, as the SDK's worker sends it.
        task_id = pb.GatewayMessage.FromString(self.encode_assignment()).task.request.task_id
        answer = bx._result_pb(self.agent_output)
        answer.task_id = task_id
        self.agent_message = pb.AgentMessage(
            update=pb.TaskUpdate(task_id=task_id, state=answer.state, result=answer)
        ).SerializeToString()
        self.agent_result = self.decode_agent_result()
        self.shared = shared = self.share_filter()
        before, after, self.encoded = self.result_digests()
        receipt = self.sign_receipt()
        self.released = TaskResult(
            task_id,
            TaskState.COMPLETED,
            output=shared.output,
            field_actions=_actions(shared),
            receipt=receipt,
            responder_org=beta,
            policy_version=shared.policy_version,
        )
        self.records[beta, "close"] = (
            _event(
                "result_released",
                inbound,
                alpha,
                direction="inbound",
                decision="partial",
                status=TaskState.COMPLETED.value,
                withheld_paths=shared.withheld,
                transformed=shared.transformed,
                digest_before=before,
                digest_after=after,
                policy_version=shared.policy_version,
                receipt=receipt,
            ),
            inbound,
            self.released,
        )
        self.peer_result = self.encode_for_requester()
        # alpha: the peer's answer.
        self.result = result = self.decode_peer_result()
        self.verify_receipt()
        self.received = received = replace(result, responder_org=beta, turn=0)
        self.records[alpha, "close"] = (
            _event(
                "result_received",
                spec,
                beta,
                direction="outbound",
                decision="allowed",
                status=received.state.value,
                **_split(received.field_actions),
                digest_after=self.result_received_digest(),
                policy_version=received.policy_version,
                receipt=received.receipt,
            ),
            spec,
            received,
        )
        self.sdk_result = self.encode_for_sdk()
        self.check = self._check()

    # ---- alpha, the requester's gateway ----

    def decode_sdk_request(self) -> TaskSpec:
        """The participant servicer: grpc's decoder, then the wire's spec."""
        return spec_from_pb(
            pb.TaskRequest.FromString(self.sdk_request),
            default_deadline=DEFAULT_DEADLINE,
            max_deadline=MAX_DEADLINE,
            time_remaining=TIME_REMAINING,
        )

    def verify_token(self) -> TokenClaims:
        """The participant servicer's _authorize_call: the token, then the call it grants."""
        tokens = self.gw.tokens
        claims = tokens.verify(self.gw.token)
        tokens.check_call(claims, RESPONDER_ORG, AGENT, self.skill)
        return claims

    def send_filter(self) -> FilterResult:
        """Steps.filter in admit_outbound: the data's origin is our own organization."""
        return self.gw.policy[REQUESTER_ORG].filter(
            RESPONDER_ORG,
            AGENT,
            self.skill,
            "send",
            self.spec.input,
            {"origin": (REQUESTER_ORG,)},
            max_depth=LIMITS.max_depth,
            max_fields=LIMITS.max_fields,
        )

    def request_digests(self) -> tuple[str, str, bytes]:
        return Steps.digests(self.gw.digest_key[REQUESTER_ORG], self.spec.input, self.sent)  # type: ignore[arg-type]

    def issue_delegation(self) -> str:
        """Steps.delegation_for: a fresh statement of who asked, for the target only."""
        spec = self.spec
        return issue_delegation(
            self.gw.signer[REQUESTER_ORG],
            audience_org=RESPONDER_ORG,
            subject=spec.requester,
            roles=spec.roles,
            purpose=spec.purpose,
            task_id=spec.task_id,
            ttl_seconds=300.0,
            chain_sequence=CHAIN_HEAD[0],
            chain_head=CHAIN_HEAD[1],
        )

    def encode_for_peer(self) -> bytes:
        return spec_to_pb(self.outbound, sender_org=REQUESTER_ORG).SerializeToString()

    def decode_peer_result(self) -> TaskResult:
        return result_from_pb(pb.TaskResult.FromString(self.peer_result))

    def verify_receipt(self) -> None:
        """Steps.receive: signer, task, turn, state and the output the receipt commits to."""
        result = self.result
        assert result.receipt is not None
        verify_receipt(
            self.gw.verifier[REQUESTER_ORG],
            SignedReceipt.from_json(result.receipt),
            expected_org=RESPONDER_ORG,
            released_output=result.output,
            task_id=self.spec.task_id,
            turn=0,
            state=result.state.value,
        )

    def result_received_digest(self) -> str:
        """Steps.receive, after the receipt: the record's digest and the payload limits."""
        output = self.result.output
        check_limits(output, max_depth=LIMITS.max_depth, max_fields=LIMITS.max_fields)
        return digest(output)

    def encode_for_sdk(self) -> bytes:
        return result_to_pb(self.received).SerializeToString()

    # ---- beta, the responder's gateway ----

    def decode_peer_request(self) -> TaskSpec:
        """The federation servicer: grpc's decoder, then the wire's spec."""
        return spec_from_pb(
            pb.TaskRequest.FromString(self.peer_request),
            default_deadline=DEFAULT_DEADLINE,
            max_deadline=MAX_DEADLINE,
            time_remaining=TIME_REMAINING,
        )

    def verify_delegation(self, statement: str) -> Delegation:
        """The federation servicer's _admit: who asked, signed by the calling gateway."""
        return self.gw.delegations.verify(
            statement, peer_org=REQUESTER_ORG, task_id=self.spec.task_id
        )

    def fresh_statements(self, count: int) -> list[str]:
        """The replay cache refuses a statement it has seen: each call gets its own."""
        return [self.issue_delegation() for _ in range(count)]

    def admit(self) -> None:
        """Steps.admit_inbound: the invoke policy, then the payload limits."""
        spec = self.inbound
        policy = self.gw.policy[RESPONDER_ORG]
        if not policy.may_invoke(REQUESTER_ORG, spec.agent, spec.skill, self.claims).allowed:
            raise RuntimeError(f"beta refused {spec.agent}.{spec.skill} to alpha")
        check_limits(spec.input, max_depth=LIMITS.max_depth, max_fields=LIMITS.max_fields)

    def request_received_digest(self) -> str:
        """Steps.admit_inbound: the digest of what arrived, for its record."""
        return digest(self.inbound.input)

    def encode_assignment(self) -> bytes:
        """The participant servicer's Connect stream: the task, for the agent."""
        return pb.GatewayMessage(
            task=pb.TaskAssignment(
                request=spec_to_pb(self.inbound, sender_org=REQUESTER_ORG),
                requester_org=REQUESTER_ORG,
            )
        ).SerializeToString()

    def decode_agent_result(self) -> TaskResult:
        """The participant servicer's _read_updates, and the final result of the turn."""
        update = update_from_pb(pb.AgentMessage.FromString(self.agent_message).update)
        assert update.result is not None
        return replace(update.result, responder_org=RESPONDER_ORG, turn=0)

    def share_filter(self) -> FilterResult:
        policy = self.gw.policy[RESPONDER_ORG]
        return share_filter(policy, self.skill, self.agent_result.output, self.claims)

    def result_digests(self) -> tuple[str, str, bytes]:
        output = self.agent_result.output
        return Steps.digests(self.gw.digest_key[RESPONDER_ORG], output, self.shared)  # type: ignore[arg-type]

    def sign_receipt(self) -> dict[str, Any]:
        """Steps.release: the receipt over the canonical bytes, in its JSON form with its salt."""
        shared = self.shared
        return sign_result(
            self.gw.signer[RESPONDER_ORG],
            task_id=self.spec.task_id,
            encoded_output=self.encoded,
            withheld_paths=shared.withheld,
            field_actions=shared.transformed,
            policy_version=shared.policy_version,
            state=TaskState.COMPLETED.value,
            turn=0,
            chain_sequence=CHAIN_HEAD[0],
            chain_head=CHAIN_HEAD[1],
        ).to_json()

    def encode_for_requester(self) -> bytes:
        return result_to_pb(self.released).SerializeToString()

    def _check(self) -> str:
        """What the policies did, checked as bench_exchange checks a live exchange."""
        withheld = set(self.shared.withheld)
        if withheld != bx.RESULT_WITHHELD:
            raise RuntimeError(f"unexpected withheld fields in the result: {sorted(withheld)}")
        patient = self.received.output["patient"]
        if not str(patient.get("insurance_id", "")).startswith("pseu_"):
            raise RuntimeError("patient.insurance_id was not pseudonymized")
        if patient.get("date_of_birth") != "1984":
            raise RuntimeError("patient.date_of_birth was not generalized")
        for side, before, after in (
            ("request", self.request_input, self.sent.output),
            ("result", self.agent_output, self.received.output),
        ):
            if after.get("blob") != before.get("blob"):
                raise RuntimeError(f"the blob of the {side} did not pass whole")
        return (
            f"result: {len(withheld)} fields withheld, 1 pseudonymized, 1 generalized, receipt "
            f"verified; request: {len(self.sent.withheld)} withheld, "
            f"{len(self.sent.transformed)} transformed"
        )


@dataclass(frozen=True)
class Step:
    """A synchronous step: `run()`, or `run(item)` with items made before the timing."""

    name: str
    run: Callable[..., object]
    items: Callable[[int], Sequence[Any]] | None = None


def synchronous_steps(x: Exchange) -> list[Step]:
    """The rows that are one synchronous call each: the Exchange's method of that name."""
    return [
        Step(name, getattr(x, how), x.fresh_statements if how == "verify_delegation" else None)
        for _, name, how in ROWS
        if not how.startswith("store:")
    ]


# ---- timing --------------------------------------------------------------------------------


def _loop_cpu(step: Step, count: int) -> float:
    """Process CPU seconds of `count` calls of `step` (its items made first, not timed)."""
    items = step.items(count) if step.items else None
    run = step.run
    enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.process_time()
        if items is None:
            for _ in range(count):
                run()
        else:
            for item in items:
                run(item)
        return time.process_time() - started
    finally:
        if enabled:
            gc.enable()


def _calibrate(step: Step, settings: Settings) -> tuple[int, float]:
    """timeit's autorange on process_time: a call count whose loop takes at least
    `settings.round_seconds`, and the CPU seconds per call of that first loop."""
    count = 1
    while True:
        spent = _loop_cpu(step, count)
        if spent >= settings.round_seconds:
            return count, spent / count
        count = max(count * 2, int(count * 1.2 * settings.round_seconds / max(spent, 1e-7)))


def cpu_us(steps: Sequence[Step], settings: Settings) -> list[float]:
    """µs of process CPU per call of each step: the minimum of `settings.rounds` loops, taken
    round-robin over all the steps, so that what else runs on the machine meanwhile spreads
    over every step alike (and one quiet moment is enough for each)."""
    calibrated = [_calibrate(step, settings) for step in steps]
    counts, best = [c for c, _ in calibrated], [b for _, b in calibrated]
    for _ in range(settings.rounds - 1):
        for i, step in enumerate(steps):
            best[i] = min(best[i], _loop_cpu(step, counts[i]) / counts[i])
    return [seconds * 1e6 for seconds in best]


# ---- the stores ----------------------------------------------------------------------------


def store_items(x: Exchange, org: str, kind: str, task_ids: list[str]) -> list[tuple[Any, TaskOp]]:
    """A store step's (event, task-table op) for each task id: the exchange's, under new ids."""
    record, spec, result = x.records[org, kind]
    origin = REQUESTER_ORG  # alpha's own task; at beta, a task from alpha
    items: list[tuple[Any, TaskOp]] = []
    for task_id in task_ids:
        task = replace(spec, task_id=task_id)
        op: TaskOp
        if kind == "open":
            op = Accept(origin, task, org == REQUESTER_ORG)  # sent to a partner: no input kept
        else:
            assert result is not None
            op = Finish(origin, task_key(origin, task)[1], replace(result, task_id=task_id))
        items.append((replace(record, task_id=task_id), op))
    return items


async def _write_all(store: Any, items: list[tuple[Any, TaskOp]]) -> float:
    """Process CPU seconds per step, the steps written by WRITERS concurrent writers."""
    queue = iter(items)

    async def writer() -> None:
        for record, op in queue:
            if (await store.write(record, op)).existing is not None:
                raise RuntimeError(f"task {record.task_id} was accepted before")

    started = time.process_time()
    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    return (time.process_time() - started) / len(items)


async def store_cpu(
    folder: Path, exchanges: dict[str, Exchange], settings: Settings
) -> dict[str, dict[str, float]]:
    """µs of process CPU per store step, by row and size: each gateway's one database, SQLite
    in WAL mode with synchronous=FULL (gateway.store.db), as `fedgate serve` opens it."""
    figures: dict[str, dict[str, float]] = {}
    for org in (REQUESTER_ORG, RESPONDER_ORG):
        store = open_store(f"sqlite:///{folder / f'{org}-audit.db'}")
        await store.start()
        try:
            warm = [str(uuid.uuid4()) for _ in range(2 * WRITERS)]  # the database, its WAL file
            for kind in ("open", "close"):
                await _write_all(store, store_items(exchanges[SIZES[0][0]], org, kind, warm))
            for (label, _), steps in zip(SIZES, settings.store_steps, strict=True):
                best = {"open": float("inf"), "close": float("inf")}
                for _ in range(settings.async_rounds):
                    task_ids = [str(uuid.uuid4()) for _ in range(steps)]
                    for kind in ("open", "close"):  # every task's accept, then its finish
                        items = store_items(exchanges[label], org, kind, task_ids)
                        best[kind] = min(best[kind], await _write_all(store, items))
                for kind, seconds in best.items():
                    figures.setdefault(STORE_STEPS[org, kind], {})[label] = seconds * 1e6
        finally:
            await store.close()
    return figures


# ---- gRPC ----------------------------------------------------------------------------------


async def grpc_cpu(
    pki: bx.Pki, exchanges: dict[str, Exchange], settings: Settings
) -> dict[str, float]:
    """µs of process CPU per unary call over mTLS (alpha's client certificate, beta's server
    one), both ends in this process, WRITERS in flight, with each size's federation hop bytes:
    the peer's request in, the peer's result back (generic bytes methods, as bench.relay)."""
    replies = {label: x.peer_result for label, x in exchanges.items()}
    methods = {f"S{i}": label for i, (label, _) in enumerate(SIZES)}

    def answer(label: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        async def reply(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return replies[label]

        return reply

    handlers = {m: grpc.unary_unary_rpc_method_handler(answer(lb)) for m, lb in methods.items()}
    server = grpc.aio.server(options=relay.SERVER_OPTIONS)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Steps", handlers),)
    )
    ca = pki.ca.read_bytes()
    credentials = grpc.ssl_server_credentials(
        [(pki.key[RESPONDER_ORG].read_bytes(), pki.cert[RESPONDER_ORG].read_bytes())],
        root_certificates=ca,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=pki.key[REQUESTER_ORG].read_bytes(),
            certificate_chain=pki.cert[REQUESTER_ORG].read_bytes(),
        ),
        [*relay.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", org_dns_name(RESPONDER_ORG))],
    )
    figures: dict[str, float] = {}
    try:
        for (method, label), calls in zip(methods.items(), settings.grpc_calls, strict=True):
            stub = channel.unary_unary(f"/bench.Steps/{method}")
            request, size = exchanges[label].peer_request, len(replies[label])
            # The connection, its buffers and flow-control windows, warm.
            await _calls(stub, request, max(WRITERS, calls // 4), size)
            best = float("inf")
            for _ in range(settings.async_rounds):
                started = time.process_time()
                await _calls(stub, request, calls, size)
                best = min(best, (time.process_time() - started) / calls)
            figures[label] = best * 1e6
    finally:
        await channel.close()
        await server.stop(None)
    return figures


async def _calls(stub: Any, request: bytes, count: int, reply_bytes: int) -> None:
    """`count` calls, WRITERS in flight."""
    left = count

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reply = await stub(request, timeout=60)
            if len(reply) != reply_bytes:
                raise RuntimeError(f"got {len(reply)} bytes back, expected {reply_bytes}")

    await asyncio.gather(*(caller() for _ in range(min(WRITERS, count))))


# ---- the run -------------------------------------------------------------------------------


@dataclass
class Report:
    text: str
    rows: dict[str, dict[str, float]]  # µs by row (the totals too) and size label
    rules: dict[int, dict[str, float]]  # the share filter: µs by rule count and size label


def _progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def measure(settings: Settings) -> Report:
    labels = [label for label, _ in SIZES]
    rows: dict[str, dict[str, float]] = {}
    rules: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-steps-") as tmp:
        folder = Path(tmp)
        _progress("keys, certificates, a token, the policies; one exchange per size")
        gw = Gateways.create(folder)
        exchanges = {label: Exchange(gw, size) for label, size in SIZES}
        timed: list[tuple[dict[str, float], str, Step]] = []  # (where the figure goes, size)
        for label, x in exchanges.items():
            timed += [(rows.setdefault(s.name, {}), label, s) for s in synchronous_steps(x)]
        for filler in RULE_FILLERS:
            policy = (
                gw.policy[RESPONDER_ORG]
                if filler == FILLER
                else load_rules(folder, RESPONDER_ORG, filler)
            )
            figures = rules.setdefault(len(policy.rules), {})
            for label, x in exchanges.items():
                output = x.agent_result.output
                run = functools.partial(share_filter, policy, x.skill, output, x.claims)
                timed.append((figures, label, Step("share filter", run)))
        _progress(
            f"{len(timed)} synchronous steps (3 sizes; the share filter at 13 to 10,000 rules), "
            f"{settings.rounds} rounds"
        )
        for (figures, label, _), us in zip(
            timed, cpu_us([step for _, _, step in timed], settings), strict=True
        ):
            figures[label] = us
        _progress(f"the store steps: {WRITERS} writers, durable SQLite")
        rows.update(await store_cpu(folder, exchanges, settings))
        _progress(f"gRPC calls over mTLS, {WRITERS} in flight")
        rows[GRPC_STEP] = await grpc_cpu(gw.pki, exchanges, settings)
        for total, names in (
            (REQUESTER_TOTAL, REQUESTER_STEPS),
            (RESPONDER_TOTAL, RESPONDER_STEPS),
        ):
            rows[total] = {x: sum(rows[n][x] for n in (*names, GRPC_STEP)) for x in labels}
        text = render(settings, gw, exchanges, rows, rules)
    return Report(text, rows, rules)


def _us(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def full_bench_cpu() -> dict[str, float] | None:
    """Each gateway's CPU per exchange (ms) in bench.bench_exchange, if it ran in this process
    (as `python -m bench` runs it, before this bench)."""
    outcome = bx.LAST
    if outcome is None:
        return None
    found = {}
    for hop, total in (("A", REQUESTER_TOTAL), ("B", RESPONDER_TOTAL)):
        match = re.search(
            rf"CPU per exchange at 32 in flight, hop {hop} \(ms\)\s+[\d.]+\s+([\d.]+)", outcome.text
        )
        if match is None:
            return None
        found[total] = float(match.group(1))
    return found


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, 100, subsequent_indent="  ")


def render(
    settings: Settings,
    gw: Gateways,
    exchanges: dict[str, Exchange],
    rows: dict[str, dict[str, float]],
    rules: dict[int, dict[str, float]],
) -> str:
    labels = [label for label, _ in SIZES]
    width = max(len(name) for name in rows) + 2
    header = "µs of CPU per exchange".ljust(width) + "".join(f"{x:>9}" for x in labels)

    def line(name: str, values: dict[str, float], indent: str = "  ") -> str:
        return (indent + name).ljust(width) + "".join(f"{_us(values[x]):>9}" for x in labels)

    small = exchanges[labels[0]]
    sizes = "; ".join(
        f"{label}: {len(canonical_bytes(x.request_input)):,} / "
        f"{len(canonical_bytes(x.agent_output)):,} B of JSON, {len(x.peer_request):,} / "
        f"{len(x.peer_result):,} B on the wire"
        for label, x in exchanges.items()
    )
    out = [
        f"CPU per exchange, step by step, in isolation [{settings.mode}]",
        bx.machine(),
        *_wrapped(
            "inputs: bench_exchange's 20-field request and result (+ a blob for 64 KB and 1 MiB), "
            f"{len(gw.policy[REQUESTER_ORG].rules):,} rules on alpha and "
            f"{len(gw.policy[RESPONDER_ORG].rules):,} on beta; request / result: {sizes}"
        ),
        f"checked: {small.check}",
        *_wrapped(
            f"timing: process_time, the minimum of {settings.rounds} loops of >= "
            f"{settings.round_seconds * 1000:g} ms; store steps and gRPC: the whole process "
            f"(its threads too) with {WRITERS} concurrent, the minimum of "
            f"{settings.async_rounds} round(s)"
        ),
        "",
        header,
        "-" * len(header),
    ]
    for title, names in (
        ("requester gateway (alpha)", REQUESTER_STEPS),
        ("responder gateway (beta)", RESPONDER_STEPS),
        ("both gateways (counted in each total: each serves one call and makes one)", (GRPC_STEP,)),
    ):
        out.append(title)
        out += [line(name, rows[name]) for name in names]
    out.append("-" * len(header))
    out += [line(total, rows[total], indent="") for total in (REQUESTER_TOTAL, RESPONDER_TOTAL)]
    out += ["", "share filter by rule count (beta; bench.bench_policy holds the flatness target)"]
    out += [line(f"share filter, {count:,} rules", us) for count, us in rules.items()]
    first, last = min(rules), max(rules)
    out.append(
        line(
            f"{last:,} / {first:,} rules (x)", {x: rules[last][x] / rules[first][x] for x in labels}
        )
    )
    out.append("")
    measured = full_bench_cpu()
    if measured is None:
        out += _wrapped(
            "orchestration: bench.bench_exchange did not run in this process (`python -m bench` "
            "runs it first). What it measures per gateway (CPU per exchange at 32 in flight, "
            "1 KB) minus the totals above is orchestration: the event loop, tasks, queues and "
            "futures, grpc's callbacks, the agent's stream; no step here owns it."
        )
    for total, ms in (measured or {}).items():
        steps_ms = rows[total][labels[0]] / 1000
        out += _wrapped(
            f"orchestration, {total.removeprefix('total, ').split(' (')[0]}: bench.bench_exchange "
            f"measured {ms:.3f} ms per exchange at 32 in flight, the steps sum to "
            f"{steps_ms:.3f} ms: the other {ms - steps_ms:.3f} ms "
            f"({100 * (ms - steps_ms) / ms:.0f}%) is orchestration (event loop, tasks, queues and "
            "futures, grpc's callbacks, the agent's stream), which no step owns"
        )
    return "\n".join(out)


LAST: Report | None = None


def main(argv: Sequence[str] | None = None) -> int:
    global LAST
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="shorter loops (a few seconds)")
    args = parser.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]
    started = time.perf_counter()
    LAST = asyncio.run(measure(settings))
    print(LAST.text)
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
