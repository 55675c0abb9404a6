"""Conversions between protobuf messages and the gateway's dataclasses (the edge, nothing more)."""

from __future__ import annotations

import time
from typing import Any

from fedgate.convert import (
    ACTION_KINDS,
    dict_to_struct,
    field_actions_from_pb,
    receipt_json,
    struct_to_dict,
)
from fedgate.v1 import fedgate_pb2 as pb

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
        input_field_actions=field_actions_from_pb(message.input_field_actions),
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
    return message


def result_from_pb(message: pb.TaskResult) -> TaskResult:
    error = message.error if message.HasField("error") else None
    return TaskResult(
        task_id=message.task_id,
        state=state_from_pb(message.state),
        output=struct_to_dict(message.output),
        field_actions=field_actions_from_pb(message.field_actions),
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
    )


def update_to_pb(update: TaskUpdate) -> pb.TaskUpdate:
    message = pb.TaskUpdate(
        task_id=update.task_id, state=state_to_pb(update.state), message=update.message
    )
    if update.result is not None:
        message.result.CopyFrom(result_to_pb(update.result))
    return message


def update_from_pb(message: pb.TaskUpdate) -> TaskUpdate:
    return TaskUpdate(
        task_id=message.task_id,
        state=state_from_pb(message.state),
        message=message.message,
        result=result_from_pb(message.result) if message.HasField("result") else None,
    )


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
    """The JSON form of a received receipt, as verified and kept in the audit log."""
    return receipt_json(message)


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
