"""Conversions between protobuf messages and the gateway's dataclasses (the edge, nothing more).

What arrives is checked here, once, for every caller (a peer gateway, a local agent or requester):
no protocol string (a name, an id, a path, a text) carries a NUL character (PostgreSQL text cannot
hold one, and no name needs one), and whatever the gateway keeps (audit records, the task table)
is bounded: field actions by count and path, names and texts by length, checkpoints and receipts
by the shape of what they sign. A field past a bound is InvalidArgument naming the field and the
bound. Payloads are JSON: their keys and values may hold any text (a path that names a key
escapes it), and a number JSON cannot carry is ValueError, as it always was.

Only a final or turn-ending (input-required) update carries a result, in either direction: on any
other update (submitted, working) a result is dropped, whoever sent it (guarantee 8).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from fedgate.convert import (
    ACTION_KINDS,
    ACTION_NAMES,
    dict_to_struct,
    field_actions_from_pb,
    receipt_json,
    struct_to_dict,
)
from fedgate.v1 import fedgate_pb2 as pb

from gateway.config import ORG_NAME
from gateway.errors import InvalidArgument
from gateway.exchange.tasks import (
    AgentCard,
    SkillCard,
    TaskError,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUpdate,
)
from gateway.identity.signing import SignedCheckpoint, SignedReceipt
from gateway.policy.paths import PathSyntaxError, parse_normalized, parse_reported

log = logging.getLogger("fedgate.wire")

# Bounds on what a caller sends that the gateway keeps or signs over.
MAX_FIELD_ACTIONS = 1_000
MAX_PATH_CHARS = 512
MAX_FIELD_ACTION_CHARS = 64 * 1024  # all paths of one message together
MAX_NAME_CHARS = 256  # requester, purpose, a role, a version
MAX_TEXT_CHARS = 4_096  # a description, a reason, an error message
MAX_ROLES = 1_024
MAX_STATEMENT_CHARS = 16 * 1024  # a delegation statement
MAX_PROVENANCE = 64
MAX_CERTIFICATE_BYTES = 8 * 1024  # a gateway certificate (DER) is under 1 KiB
MAX_SIGNATURE_BYTES = 256  # an ECDSA P-256 signature (DER) is at most 72 bytes
MAX_SEQUENCE = 2**53 - 1  # an audit sequence number, exact in JSON
MAX_TIME_MS = 10**13  # milliseconds since the epoch: until the year 2286
HEAD_HASH = re.compile(r"^[0-9a-f]{64}$")
# States whose update may carry a result: the final ones, and input-required, which ends a turn.
_CARRIES_RESULT = frozenset(state for state in TaskState if state.final) | {
    TaskState.INPUT_REQUIRED
}

_STATE_TO_PB = {
    TaskState.SUBMITTED: pb.TASK_STATE_SUBMITTED,
    TaskState.WORKING: pb.TASK_STATE_WORKING,
    TaskState.COMPLETED: pb.TASK_STATE_COMPLETED,
    TaskState.FAILED: pb.TASK_STATE_FAILED,
    TaskState.CANCELED: pb.TASK_STATE_CANCELED,
    TaskState.INPUT_REQUIRED: pb.TASK_STATE_INPUT_REQUIRED,
    TaskState.REJECTED: pb.TASK_STATE_REJECTED,
    TaskState.AUTH_REQUIRED: pb.TASK_STATE_AUTH_REQUIRED,
}
_STATE_FROM_PB = {value: key for key, value in _STATE_TO_PB.items()}


def carries_result(state: TaskState) -> bool:
    """Whether an update in `state` may carry a result (final, or input-required)."""
    return state in _CARRIES_RESULT


def check_text(field: str, value: str, limit: int) -> str:
    """`value` if it holds no NUL and at most `limit` characters, else InvalidArgument."""
    if "\x00" in value:
        raise InvalidArgument(
            f"{field} contains a NUL character: text on the wire never holds one, remove it"
        )
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters ({len(value)})")
    return value


@functools.lru_cache(maxsize=4096)
def _check_path(field: str, path: str) -> None:
    """Paths repeat from one message to the next (the same policy reports the same ones):
    a path checked once is not parsed again."""
    check_text(field, path, MAX_PATH_CHARS)
    try:
        parse_reported(path)  # a reported path: concrete, `*` for a key no rule names ...
    except PathSyntaxError:
        try:
            parse_normalized(path)  # ... or a normalized one (items[].price)
        except PathSyntaxError as exc:
            raise InvalidArgument(f"{field} {path[:64]!r} is not a field path: {exc}") from None


def _check_paths(field: str, paths: Iterable[str]) -> None:
    paths = list(paths)
    if len(paths) > MAX_FIELD_ACTIONS:
        raise InvalidArgument(
            f"{field}: {len(paths)} paths, more than the {MAX_FIELD_ACTIONS} allowed"
        )
    if sum(len(p) for p in paths) > MAX_FIELD_ACTION_CHARS:
        raise InvalidArgument(
            f"{field}: the paths hold more than {MAX_FIELD_ACTION_CHARS} characters together"
        )
    for path in paths:
        _check_path(field, path)


def _peer_field_actions(
    field: str, actions: Iterable[pb.FieldAction], *, known_only: bool
) -> tuple[tuple[str, str], ...]:
    """Field actions a caller sent, validated: count, paths (length, syntax) and kind.

    With `known_only`, an action kind this version does not know is refused; otherwise it counts
    as withheld (what a result from a newer peer means to us).
    """
    actions = list(actions)
    _check_paths(field, (a.path for a in actions))
    if known_only:
        for action in actions:
            if action.action not in ACTION_NAMES:
                raise InvalidArgument(
                    f"{field}: unknown action kind {action.action} at {action.path[:64]!r} "
                    f"(known: {', '.join(sorted(ACTION_KINDS))})"
                )
    return field_actions_from_pb(actions)


def state_to_pb(state: TaskState) -> pb.TaskState:
    return _STATE_TO_PB[state]


def state_from_pb(value: pb.TaskState) -> TaskState:
    try:
        return _STATE_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"unknown task state {value}") from None


def _actions_to_pb(actions: tuple[tuple[str, str], ...]) -> list[pb.FieldAction]:
    return [pb.FieldAction(path=path, action=ACTION_KINDS[action]) for path, action in actions]


def spec_from_pb(
    message: pb.TaskRequest,
    *,
    default_deadline: float,
    max_deadline: float,
    time_remaining: float | None,
) -> TaskSpec:
    """A TaskSpec from a request, its deadline bounded by the gateway's limits and the call's."""
    now = time.time()
    deadline = (
        message.deadline_unix_ms / 1000 if message.deadline_unix_ms > 0 else now + default_deadline
    )
    deadline = min(deadline, now + max_deadline)
    if time_remaining is not None:
        deadline = min(deadline, now + time_remaining)
    # Generous bounds: the router checks names, ids, purpose and roles precisely (and records
    # its refusal); these keep an absurd size or a NUL from going anywhere at all.
    for name in (
        "task_id",
        "target_org",
        "agent",
        "skill",
        "sender_org",
        "requester",
        "idempotency_key",
        "parent_task_id",
        "purpose",
    ):
        check_text(f"the request's {name}", getattr(message, name), MAX_TEXT_CHARS)
    check_text("the request's delegation", message.delegation, MAX_STATEMENT_CHARS)
    if len(message.roles) > MAX_ROLES:
        raise InvalidArgument(f"the request names more than {MAX_ROLES} roles")
    for role in message.roles:
        check_text("a role of the request", role, MAX_TEXT_CHARS)
    actions = _peer_field_actions(
        "the request's input_field_actions", message.input_field_actions, known_only=True
    )
    return TaskSpec(
        task_id=message.task_id,
        target_org=message.target_org,
        agent=message.agent,
        skill=message.skill,
        input=struct_to_dict(message.input),
        requester=message.requester,
        deadline=deadline,
        idempotency_key=message.idempotency_key,
        delegation=message.delegation,
        input_field_actions=actions,
        parent_task_id=message.parent_task_id,
        purpose=message.purpose,
        roles=tuple(message.roles),
        resume=message.resume,
        turn=max(0, message.turn),
    )


def spec_to_pb(spec: TaskSpec, *, sender_org: str) -> pb.TaskRequest:
    return pb.TaskRequest(
        task_id=spec.task_id,
        target_org=spec.target_org,
        agent=spec.agent,
        skill=spec.skill,
        input=dict_to_struct(spec.input),
        sender_org=sender_org,
        requester=spec.requester,
        deadline_unix_ms=int(spec.deadline * 1000),
        idempotency_key=spec.idempotency_key,
        input_field_actions=_actions_to_pb(spec.input_field_actions),
        delegation=spec.delegation,
        parent_task_id=spec.parent_task_id,
        purpose=spec.purpose,
        roles=list(spec.roles),
        resume=spec.resume,
        turn=spec.turn,
    )


def result_to_pb(result: TaskResult) -> pb.TaskResult:
    message = pb.TaskResult(
        task_id=result.task_id,
        state=state_to_pb(result.state),
        output=dict_to_struct(result.output),
        field_actions=_actions_to_pb(result.field_actions),
        responder_org=result.responder_org,
        policy_version=result.policy_version,
        turn=result.turn,
    )
    if result.error is not None:
        message.error.CopyFrom(pb.TaskError(code=result.error.code, message=result.error.message))
    if result.receipt is not None:
        receipt = SignedReceipt.from_json(result.receipt)
        message.receipt.CopyFrom(_signed_receipt_to_pb(receipt))
        # protocol: the salt travels beside the receipt, to the direct requester only.
        message.receipt_salt = receipt.salt
    # A provenance Receipt has no salt field, so no salt can leave inside provenance.
    message.provenance.extend(receipt_to_pb(r) for r in result.provenance)
    if result.checkpoint is not None:
        message.responder_checkpoint.CopyFrom(
            checkpoint_to_pb(SignedCheckpoint.from_json(result.checkpoint))
        )
    return message


def result_from_pb(message: pb.TaskResult) -> TaskResult:
    """A result received (from a peer or an agent), each field checked against its bound."""
    state = state_from_pb(message.state)
    check_text("the result's task_id", message.task_id, MAX_NAME_CHARS)
    check_text("the result's responder_org", message.responder_org, MAX_NAME_CHARS)
    check_text("the result's policy_version", message.policy_version, MAX_NAME_CHARS)
    error = message.error if message.HasField("error") else None
    if error is not None:
        check_text("the result's error code", error.code, MAX_NAME_CHARS)
        check_text("the result's error message", error.message, MAX_TEXT_CHARS)
    if len(message.provenance) > MAX_PROVENANCE:
        raise InvalidArgument(
            f"the result carries {len(message.provenance)} provenance receipts, more than the "
            f"{MAX_PROVENANCE} allowed"
        )
    return TaskResult(
        task_id=message.task_id,
        state=state,
        output=struct_to_dict(message.output),
        field_actions=_peer_field_actions(
            "the result's field_actions", message.field_actions, known_only=False
        ),
        error=TaskError(error.code, error.message) if error is not None else None,
        receipt=(
            receipt_json(message.receipt, salt=message.receipt_salt)
            if message.HasField("receipt")
            else None
        ),
        responder_org=message.responder_org,
        policy_version=message.policy_version,
        provenance=tuple(receipt_from_pb(r) for r in message.provenance),
        turn=max(0, message.turn),
        checkpoint=(
            checkpoint_from_pb(message.responder_checkpoint).to_json()
            if message.HasField("responder_checkpoint")
            else None
        ),
    )


def update_to_pb(update: TaskUpdate) -> pb.TaskUpdate:
    """An update as sent; a result rides only on a final or input-required one (guarantee 8)."""
    message = pb.TaskUpdate(
        task_id=update.task_id, state=state_to_pb(update.state), message=update.message
    )
    if update.result is not None:
        if carries_result(update.state):
            message.result.CopyFrom(result_to_pb(update.result))
        else:
            log.error(
                "task %s: a %s update held a result; it was not sent (only a final or "
                "input-required update carries one)",
                update.task_id,
                update.state.value,
            )
    return message


def signed_output_only(update: TaskUpdate) -> TaskUpdate:
    """`update` with any output that no receipt signs removed: what crosses a boundary (to a
    peer, or from one to our requester) carries output only as a signed result."""
    result = update.result
    if result is None or not result.output or result.receipt is not None:
        return update
    log.error(
        "task %s: a %s result without a receipt held output; the output was not passed on",
        update.task_id,
        update.state.value,
    )
    return replace(update, result=replace(result, output={}))


def update_from_pb(message: pb.TaskUpdate) -> TaskUpdate:
    """An update received; a result on an update that may not carry one is dropped unread."""
    state = state_from_pb(message.state)
    result = None
    if message.HasField("result") and carries_result(state):
        result = result_from_pb(message.result)
    return TaskUpdate(task_id=message.task_id, state=state, message=message.message, result=result)


def receipt_to_pb(receipt: dict[str, Any]) -> pb.Receipt:
    """A receipt in its JSON form (gateway.identity.signing.SignedReceipt.to_json) as a message
    (without its salt, which only TaskResult.receipt_salt carries)."""
    return _signed_receipt_to_pb(SignedReceipt.from_json(receipt))


def _signed_receipt_to_pb(signed: SignedReceipt) -> pb.Receipt:
    body = signed.body
    message = pb.Receipt(
        task_id=body.task_id,
        responder_org=body.responder_org,
        withheld_paths=list(body.withheld_paths),
        field_actions=_actions_to_pb(body.field_actions),
        policy_version=body.policy_version,
        signed_at_unix_ms=body.signed_at_unix_ms,
        signer_certificate=signed.signer_certificate,
        signature=signed.signature,
    )
    if body.version == 1:
        message.result_digest = body.result_digest.encode()
    else:  # protocol: the version 2 fields
        message.version = body.version
        message.canonical = body.canonical
        message.result_commitment = body.result_commitment
        message.state = state_to_pb(TaskState(body.state))
        message.turn = body.turn
        message.chain_sequence = body.chain_sequence
        message.chain_head = body.chain_head
    return message


def receipt_from_pb(message: pb.Receipt) -> dict[str, Any]:
    """The JSON form of a received receipt, as verified and kept in the audit log; each field
    is checked against its bound first (a receipt is kept whole in the record)."""
    check_text("the receipt's task_id", message.task_id, MAX_NAME_CHARS)
    check_text("the receipt's responder_org", message.responder_org, MAX_NAME_CHARS)
    check_text("the receipt's policy_version", message.policy_version, MAX_NAME_CHARS)
    if len(message.result_digest) > MAX_NAME_CHARS:
        raise InvalidArgument(f"the receipt's result_digest is longer than {MAX_NAME_CHARS} bytes")
    _check_paths("the receipt's withheld_paths", message.withheld_paths)
    _peer_field_actions("the receipt's field_actions", message.field_actions, known_only=False)
    _check_signed_by("the receipt", message.signer_certificate, message.signature)
    return receipt_json(message)


def _check_signed_by(what: str, certificate: bytes, signature: bytes) -> None:
    if not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES:
        raise InvalidArgument(
            f"{what}'s signer_certificate must hold a DER certificate of at most "
            f"{MAX_CERTIFICATE_BYTES} bytes (got {len(certificate)})"
        )
    if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        raise InvalidArgument(
            f"{what}'s signature must be 1 to {MAX_SIGNATURE_BYTES} bytes (got {len(signature)})"
        )


def checkpoint_to_pb(checkpoint: SignedCheckpoint) -> pb.SignedCheckpoint:
    return pb.SignedCheckpoint(
        org=checkpoint.org,
        sequence=checkpoint.sequence,
        head_hash=checkpoint.head_hash,
        signed_at_unix_ms=checkpoint.signed_at_unix_ms,
        signer_certificate=checkpoint.signer_certificate,
        signature=checkpoint.signature,
    )


def checkpoint_from_pb(message: pb.SignedCheckpoint) -> SignedCheckpoint:
    """A peer's signed audit head, checked for shape (its signature is checked by the caller)."""
    if not ORG_NAME.match(message.org):
        raise InvalidArgument(
            f"the checkpoint's org {message.org[:64]!r} is not an organization name"
        )
    if not 0 <= message.sequence <= MAX_SEQUENCE:
        raise InvalidArgument(
            f"the checkpoint's sequence {message.sequence} is out of range (0 to {MAX_SEQUENCE})"
        )
    if not HEAD_HASH.match(message.head_hash):
        raise InvalidArgument(
            "the checkpoint's head_hash must be a SHA-256 in 64 lowercase hex digits, got "
            f"{message.head_hash[:80]!r}"
        )
    if not 0 < message.signed_at_unix_ms < MAX_TIME_MS:
        raise InvalidArgument(
            f"the checkpoint's signed_at_unix_ms {message.signed_at_unix_ms} is not a time in "
            "milliseconds since the epoch"
        )
    _check_signed_by("the checkpoint", message.signer_certificate, message.signature)
    return SignedCheckpoint(
        org=message.org,
        sequence=message.sequence,
        head_hash=message.head_hash,
        signed_at_unix_ms=message.signed_at_unix_ms,
        signer_certificate=message.signer_certificate,
        signature=message.signature,
    )


def card_to_pb(card: AgentCard) -> pb.AgentCard:
    return pb.AgentCard(
        org=card.org,
        name=card.name,
        description=card.description,
        version=card.version,
        skills=[
            pb.Skill(
                name=s.name,
                description=s.description,
                input_schema=dict_to_struct(s.input_schema),
                output_schema=dict_to_struct(s.output_schema),
            )
            for s in card.skills
        ],
    )


def card_from_pb(message: pb.AgentCard, *, org: str) -> AgentCard:
    """An agent's card as it registers; texts bounded, schemas must be JSON (ValueError)."""
    check_text("the card's name", message.name, MAX_NAME_CHARS)
    check_text("the card's description", message.description, MAX_TEXT_CHARS)
    check_text("the card's version", message.version, MAX_NAME_CHARS)
    for skill in message.skills:
        check_text("a skill's name", skill.name, MAX_NAME_CHARS)
        check_text(f"the description of skill {skill.name!r}", skill.description, MAX_TEXT_CHARS)
    return AgentCard(
        org=org,
        name=message.name,
        description=message.description,
        version=message.version,
        skills=tuple(
            SkillCard(
                name=s.name,
                description=s.description,
                input_schema=struct_to_dict(s.input_schema) or None,
                output_schema=struct_to_dict(s.output_schema) or None,
            )
            for s in message.skills
        ),
    )
