from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_SUBMITTED: _ClassVar[TaskState]
    TASK_STATE_WORKING: _ClassVar[TaskState]
    TASK_STATE_COMPLETED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELED: _ClassVar[TaskState]
    TASK_STATE_INPUT_REQUIRED: _ClassVar[TaskState]
    TASK_STATE_REJECTED: _ClassVar[TaskState]
    TASK_STATE_AUTH_REQUIRED: _ClassVar[TaskState]

class FieldActionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_ACTION_KIND_UNSPECIFIED: _ClassVar[FieldActionKind]
    FIELD_ACTION_KIND_WITHHELD: _ClassVar[FieldActionKind]
    FIELD_ACTION_KIND_MASKED: _ClassVar[FieldActionKind]
    FIELD_ACTION_KIND_PSEUDONYMIZED: _ClassVar[FieldActionKind]
    FIELD_ACTION_KIND_GENERALIZED: _ClassVar[FieldActionKind]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_SUBMITTED: TaskState
TASK_STATE_WORKING: TaskState
TASK_STATE_COMPLETED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELED: TaskState
TASK_STATE_INPUT_REQUIRED: TaskState
TASK_STATE_REJECTED: TaskState
TASK_STATE_AUTH_REQUIRED: TaskState
FIELD_ACTION_KIND_UNSPECIFIED: FieldActionKind
FIELD_ACTION_KIND_WITHHELD: FieldActionKind
FIELD_ACTION_KIND_MASKED: FieldActionKind
FIELD_ACTION_KIND_PSEUDONYMIZED: FieldActionKind
FIELD_ACTION_KIND_GENERALIZED: FieldActionKind

class FieldAction(_message.Message):
    __slots__ = ("path", "action")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    path: str
    action: FieldActionKind
    def __init__(self, path: _Optional[str] = ..., action: _Optional[_Union[FieldActionKind, str]] = ...) -> None: ...

class Skill(_message.Message):
    __slots__ = ("name", "description", "input_schema", "output_schema")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_schema: _struct_pb2.Struct
    output_schema: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AgentCard(_message.Message):
    __slots__ = ("org", "name", "description", "skills", "version")
    ORG_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    org: str
    name: str
    description: str
    skills: _containers.RepeatedCompositeFieldContainer[Skill]
    version: str
    def __init__(self, org: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., skills: _Optional[_Iterable[_Union[Skill, _Mapping]]] = ..., version: _Optional[str] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("task_id", "target_org", "agent", "skill", "input", "sender_org", "requester", "deadline_unix_ms", "idempotency_key", "input_field_actions", "delegation", "parent_task_id", "purpose", "roles", "resume", "turn")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ORG_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SKILL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SENDER_ORG_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    target_org: str
    agent: str
    skill: str
    input: _struct_pb2.Struct
    sender_org: str
    requester: str
    deadline_unix_ms: int
    idempotency_key: str
    input_field_actions: _containers.RepeatedCompositeFieldContainer[FieldAction]
    delegation: str
    parent_task_id: str
    purpose: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    resume: bool
    turn: int
    def __init__(self, task_id: _Optional[str] = ..., target_org: _Optional[str] = ..., agent: _Optional[str] = ..., skill: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., sender_org: _Optional[str] = ..., requester: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., input_field_actions: _Optional[_Iterable[_Union[FieldAction, _Mapping]]] = ..., delegation: _Optional[str] = ..., parent_task_id: _Optional[str] = ..., purpose: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., resume: _Optional[bool] = ..., turn: _Optional[int] = ...) -> None: ...

class TaskError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("task_id", "responder_org", "result_digest", "withheld_paths", "policy_version", "signed_at_unix_ms", "signer_certificate", "signature", "field_actions", "version", "canonical", "result_commitment", "state", "turn", "chain_sequence", "chain_head")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_ORG_FIELD_NUMBER: _ClassVar[int]
    RESULT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_PATHS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FIELD_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CANONICAL_FIELD_NUMBER: _ClassVar[int]
    RESULT_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HEAD_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    responder_org: str
    result_digest: bytes
    withheld_paths: _containers.RepeatedScalarFieldContainer[str]
    policy_version: str
    signed_at_unix_ms: int
    signer_certificate: bytes
    signature: bytes
    field_actions: _containers.RepeatedCompositeFieldContainer[FieldAction]
    version: int
    canonical: int
    result_commitment: str
    state: TaskState
    turn: int
    chain_sequence: int
    chain_head: str
    def __init__(self, task_id: _Optional[str] = ..., responder_org: _Optional[str] = ..., result_digest: _Optional[bytes] = ..., withheld_paths: _Optional[_Iterable[str]] = ..., policy_version: _Optional[str] = ..., signed_at_unix_ms: _Optional[int] = ..., signer_certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., field_actions: _Optional[_Iterable[_Union[FieldAction, _Mapping]]] = ..., version: _Optional[int] = ..., canonical: _Optional[int] = ..., result_commitment: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., turn: _Optional[int] = ..., chain_sequence: _Optional[int] = ..., chain_head: _Optional[str] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "state", "output", "field_actions", "error", "receipt", "responder_org", "policy_version", "provenance", "receipt_salt", "responder_checkpoint", "turn")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FIELD_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_ORG_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_SALT_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    output: _struct_pb2.Struct
    field_actions: _containers.RepeatedCompositeFieldContainer[FieldAction]
    error: TaskError
    receipt: Receipt
    responder_org: str
    policy_version: str
    provenance: _containers.RepeatedCompositeFieldContainer[Receipt]
    receipt_salt: bytes
    responder_checkpoint: SignedCheckpoint
    turn: int
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., field_actions: _Optional[_Iterable[_Union[FieldAction, _Mapping]]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ..., responder_org: _Optional[str] = ..., policy_version: _Optional[str] = ..., provenance: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ..., receipt_salt: _Optional[bytes] = ..., responder_checkpoint: _Optional[_Union[SignedCheckpoint, _Mapping]] = ..., turn: _Optional[int] = ...) -> None: ...

class TaskUpdate(_message.Message):
    __slots__ = ("task_id", "state", "message", "result")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    message: str
    result: TaskResult
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., message: _Optional[str] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentCard]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentCard, _Mapping]]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class SignedCheckpoint(_message.Message):
    __slots__ = ("org", "sequence", "head_hash", "signed_at_unix_ms", "signer_certificate", "signature")
    ORG_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    org: str
    sequence: int
    head_hash: str
    signed_at_unix_ms: int
    signer_certificate: bytes
    signature: bytes
    def __init__(self, org: _Optional[str] = ..., sequence: _Optional[int] = ..., head_hash: _Optional[str] = ..., signed_at_unix_ms: _Optional[int] = ..., signer_certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterAgents(_message.Message):
    __slots__ = ("cards", "instance_id", "token")
    CARDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    cards: _containers.RepeatedCompositeFieldContainer[AgentCard]
    instance_id: str
    token: str
    def __init__(self, cards: _Optional[_Iterable[_Union[AgentCard, _Mapping]]] = ..., instance_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("org", "agents")
    ORG_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    org: str
    agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, org: _Optional[str] = ..., agents: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskAssignment(_message.Message):
    __slots__ = ("request", "requester_org")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ORG_FIELD_NUMBER: _ClassVar[int]
    request: TaskRequest
    requester_org: str
    def __init__(self, request: _Optional[_Union[TaskRequest, _Mapping]] = ..., requester_org: _Optional[str] = ...) -> None: ...

class CancelAssignment(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "update")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    register: RegisterAgents
    update: TaskUpdate
    def __init__(self, register: _Optional[_Union[RegisterAgents, _Mapping]] = ..., update: _Optional[_Union[TaskUpdate, _Mapping]] = ...) -> None: ...

class GatewayMessage(_message.Message):
    __slots__ = ("registered", "task", "cancel")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    task: TaskAssignment
    cancel: CancelAssignment
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., task: _Optional[_Union[TaskAssignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelAssignment, _Mapping]] = ...) -> None: ...

class ConnectedAgent(_message.Message):
    __slots__ = ("card", "instances", "tasks_in_flight")
    CARD_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TASKS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    card: AgentCard
    instances: int
    tasks_in_flight: int
    def __init__(self, card: _Optional[_Union[AgentCard, _Mapping]] = ..., instances: _Optional[int] = ..., tasks_in_flight: _Optional[int] = ...) -> None: ...

class ListConnectedAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[ConnectedAgent]
    def __init__(self, agents: _Optional[_Iterable[_Union[ConnectedAgent, _Mapping]]] = ...) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("org", "address", "circuit", "latency_ms", "last_error", "consecutive_failures", "in_flight")
    ORG_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    org: str
    address: str
    circuit: str
    latency_ms: float
    last_error: str
    consecutive_failures: int
    in_flight: int
    def __init__(self, org: _Optional[str] = ..., address: _Optional[str] = ..., circuit: _Optional[str] = ..., latency_ms: _Optional[float] = ..., last_error: _Optional[str] = ..., consecutive_failures: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class ListPeersResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ...) -> None: ...
