"""Audit bundles: an exported log that verifies offline, and reconciling two organizations' logs.

A bundle is JSON lines:

    {"type": "header", "format": "fedgate-audit-bundle", "version": 2, "org": ...,
     "ca_certificate": PEM, "gateway_certificate": PEM, "exported_at_unix_ms": ...,
     "anchor": the signed retention checkpoint the first record chains from, or null,
     "peer": null (the whole log) or the partner it was exported for,
     "broken": null, or {"sequence", "message"}: exported from a log that failed verification}
    {"type": "record", ...}          one per record, in sequence order
    {"type": "stub", "sequence", "prev_hash", "record_hash"}   (bundles for one partner)
    {"type": "checkpoint", ...}      the signed head the records end at

A bundle for one partner (`peer`) holds that partner's exchanges in full and every other record as
a stub: its sequence number and its two hashes, nothing else (no time, kind, peer, task, digest).
A stub keeps the chain walkable: the verifier checks that the sequence is complete and that each
record and stub links to the one before, and recomputes the hash of every full record. A stub
reveals that a record exists at that position (so how many other records lie between two of the
partner's); its record hash is a SHA-256 over content that includes a random task id and exact
timings, so it cannot be guessed back. What a stub cannot prove: its hash is taken as given, so the
signed head binds the full records only back to the nearest stub; the whole log, checked by its
owner (`fedgate audit verify --evidence`) or an arbiter given both, binds every stub.

A record of the partner's own exchanges is a stub too ("sealed", with its task id and kind, which
the bundle's writer vouches for) when it would hand the partner a way to recover withheld values:
it holds a stored payload before filtering, or a plain SHA-256 pre-filter digest (records written
before pre-filter digests became keyed, `hmac-sha256:`). `--include-plain-digests` exports the
latter in full.

Version 1 bundles (no stubs, no peer, no broken mark) still read and verify.

Reconciling two bundles is gateway.audit.reconcile.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from gateway.audit.chain import AuditRecord, VerifyReport, verify_chain
from gateway.errors import InvalidArgument
from gateway.identity.signing import (
    SignedCheckpoint,
    Verifier,
    now_unix_ms,
)

BUNDLE_FORMAT = "fedgate-audit-bundle"
BUNDLE_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Events whose digest_before is what arrived from the partner (not a pre-filter digest).
RECEIVING_KINDS = frozenset({"request_received", "result_received"})
KEYED_DIGEST_PREFIX = "hmac-sha256:"
# Why a record of the partner's own exchanges went into its bundle as a stub.
SEALED_PAYLOAD = "payload"
SEALED_PLAIN_DIGEST = "plain-prefilter-digest"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ChainStub:
    """A record in a bundle by its place in the chain only: sequence and hashes, no content.

    `sealed` says why a record of the bundle's partner is a stub ("" for another exchange's
    record); `task_id` and `kind` are kept for those only, so reconcile can name them.
    """

    sequence: int
    prev_hash: str
    record_hash: str
    sealed: str = ""
    task_id: str = ""
    kind: str = ""

    def computed_hash(self) -> str:
        """Nothing to recompute without the content: the stub's hash is taken as given."""
        return self.record_hash

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sequence": self.sequence,
            "prev_hash": self.prev_hash,
            "record_hash": self.record_hash,
        }
        if self.sealed:
            data.update(sealed=self.sealed, task_id=self.task_id, kind=self.kind)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChainStub:
        sequence = data.get("sequence")
        prev_hash, record_hash = data.get("prev_hash"), data.get("record_hash")
        if not isinstance(sequence, int) or isinstance(sequence, bool):
            raise InvalidArgument("stub field 'sequence' is missing or not an integer")
        for name, value in (("prev_hash", prev_hash), ("record_hash", record_hash)):
            if not isinstance(value, str) or not _HEX64.match(value):
                raise InvalidArgument(f"stub field {name!r} is not 64 hex digits")
        texts = [data.get(name, "") for name in ("sealed", "task_id", "kind")]
        if not all(isinstance(text, str) for text in texts):
            raise InvalidArgument("stub fields sealed, task_id and kind must be strings")
        return cls(sequence, cast(str, prev_hash), cast(str, record_hash), *texts)


ChainEntry = AuditRecord | ChainStub


@dataclass(frozen=True)
class ExportProblem:
    """The verification failure a bundle was exported with (`--allow-broken`)."""

    sequence: int
    message: str


@dataclass
class Bundle:
    """An exported audit log, read back."""

    org: str
    ca_pem: bytes
    gateway_cert_pem: bytes
    exported_at_unix_ms: int
    anchor: SignedCheckpoint | None
    peer: str | None = None
    broken: ExportProblem | None = None
    chain: list[ChainEntry] = field(default_factory=list)
    checkpoints: list[SignedCheckpoint] = field(default_factory=list)

    @property
    def records(self) -> list[AuditRecord]:
        """The full records (stubs left out)."""
        return [entry for entry in self.chain if isinstance(entry, AuditRecord)]

    @property
    def stubs(self) -> list[ChainStub]:
        return [entry for entry in self.chain if isinstance(entry, ChainStub)]


@dataclass
class Written:
    """What write_bundle wrote."""

    records: int = 0
    stubs: int = 0
    sealed: int = 0
    head_sequence: int = 0


def is_keyed(digest_value: str | None) -> bool:
    """A digest keyed by its writer's secret: nobody else can recompute or test guesses on it."""
    return digest_value is not None and digest_value.startswith(KEYED_DIGEST_PREFIX)


def seal_reason(record: AuditRecord, *, include_plain_digests: bool = False) -> str:
    """Why a record of the partner's exchange must not reach that partner in full ('' if not).

    Only events of ours that sent something hold what was there before the filter: the stored
    payload (own side only, may hold withheld values) or the pre-filter digest. A plain SHA-256
    of the unfiltered payload lets the partner test guesses of what was withheld; one equal to
    digest_after tells nothing the partner does not have.
    """
    if record.kind in RECEIVING_KINDS:
        return ""
    if record.payload is not None:
        return SEALED_PAYLOAD
    before = record.digest_before
    if (
        not include_plain_digests
        and before is not None
        and not is_keyed(before)
        and before != record.digest_after
    ):
        return SEALED_PLAIN_DIGEST
    return ""


def write_bundle(
    out: TextIO,
    *,
    org: str,
    ca_pem: bytes,
    gateway_cert_pem: bytes,
    records: Iterable[AuditRecord],
    anchor: SignedCheckpoint | None,
    checkpoints: Sequence[SignedCheckpoint],
    peer: str | None = None,
    broken: ExportProblem | None = None,
    include_plain_digests: bool = False,
) -> Written:
    """Write a bundle (for one partner when `peer` is set: see the module docstring)."""
    header = {
        "type": "header",
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "org": org,
        "ca_certificate": ca_pem.decode("ascii"),
        "gateway_certificate": gateway_cert_pem.decode("ascii"),
        "exported_at_unix_ms": now_unix_ms(),
        "anchor": None if anchor is None else anchor.to_json(),
        "peer": peer,
        "broken": None
        if broken is None
        else {"sequence": broken.sequence, "message": broken.message},
    }
    out.write(json.dumps(header, sort_keys=True) + "\n")
    written = Written()
    for record in records:
        written.head_sequence = record.sequence
        reason = "" if peer is None else _stub_reason(record, peer, include_plain_digests)
        if reason is None:
            stub = ChainStub(record.sequence, record.prev_hash, record.record_hash)
        elif reason:
            stub = ChainStub(
                record.sequence,
                record.prev_hash,
                record.record_hash,
                sealed=reason,
                task_id=record.task_id,
                kind=record.kind,
            )
            written.sealed += 1
        else:
            out.write(json.dumps({"type": "record", **record.to_json()}, sort_keys=True) + "\n")
            written.records += 1
            continue
        out.write(json.dumps({"type": "stub", **stub.to_json()}, sort_keys=True) + "\n")
        written.stubs += 1
    for checkpoint in checkpoints:
        out.write(json.dumps({"type": "checkpoint", **checkpoint.to_json()}, sort_keys=True) + "\n")
    return written


def _stub_reason(record: AuditRecord, peer: str, include_plain_digests: bool) -> str | None:
    """None: another exchange's record (a plain stub); a reason: sealed; '': in full."""
    if record.peer_org != peer:
        return None
    return seal_reason(record, include_plain_digests=include_plain_digests)


def read_bundle(path: str | Path) -> Bundle:
    """Read a bundle file; raises InvalidArgument naming the line that is wrong."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read the audit bundle: {exc.strerror}") from None
    with handle:
        bundle: Bundle | None = None
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except ValueError:
                raise InvalidArgument(f"{where}: not a JSON line of an audit bundle") from None
            if not isinstance(data, dict):
                raise InvalidArgument(f"{where}: not a JSON object")
            kind = data.pop("type", None)
            try:
                if bundle is None:
                    bundle = _header(data, kind)
                elif kind == "record":
                    bundle.chain.append(AuditRecord.from_json(data))
                elif kind == "stub" and bundle.peer is not None:
                    bundle.chain.append(ChainStub.from_json(data))
                elif kind == "checkpoint":
                    bundle.checkpoints.append(SignedCheckpoint.from_json(data))
                elif kind == "stub":
                    raise InvalidArgument(
                        "a stub in a bundle of the whole log: only a bundle exported for one "
                        "partner (--peer) replaces records by stubs"
                    )
                else:
                    raise InvalidArgument(f"unknown line type {kind!r}")
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc.message}") from None
    if bundle is None:
        raise InvalidArgument(
            f"{path}: empty file, not an audit bundle (export one with `fedgate audit export`)"
        )
    return bundle


def _header(data: dict[str, Any], kind: Any) -> Bundle:
    if kind != "header" or data.get("format") != BUNDLE_FORMAT:
        raise InvalidArgument(
            "not an audit bundle (no header line): export one with `fedgate audit export`"
        )
    if data.get("version") not in READABLE_VERSIONS:
        raise InvalidArgument(
            f"audit bundle version {data.get('version')!r} is not supported (this fedgate reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}): export it again with this version"
        )
    org, ca, cert = data.get("org"), data.get("ca_certificate"), data.get("gateway_certificate")
    if not isinstance(org, str) or not isinstance(ca, str) or not isinstance(cert, str):
        raise InvalidArgument("bundle header lacks org, ca_certificate or gateway_certificate")
    exported = data.get("exported_at_unix_ms")
    anchor, peer, broken = data.get("anchor"), data.get("peer"), data.get("broken")
    if peer is not None and not isinstance(peer, str):
        raise InvalidArgument("bundle header field 'peer' must be an organization name or null")
    problem = None
    if broken is not None:
        if (
            not isinstance(broken, dict)
            or not isinstance(broken.get("sequence"), int)
            or not isinstance(broken.get("message"), str)
        ):
            raise InvalidArgument("bundle header field 'broken' must hold sequence and message")
        problem = ExportProblem(broken["sequence"], broken["message"])
    return Bundle(
        org=org,
        ca_pem=ca.encode("ascii"),
        gateway_cert_pem=cert.encode("ascii"),
        exported_at_unix_ms=exported if isinstance(exported, int) else 0,
        anchor=None if anchor is None else SignedCheckpoint.from_json(anchor),
        peer=peer,
        broken=problem,
    )


def distinct_heads(
    checkpoints: Iterable[SignedCheckpoint], head_sequence: int
) -> list[SignedCheckpoint]:
    """The signed heads worth checking against a log that ends at `head_sequence`.

    One of each (org, sequence, head hash): the same head signed again (by every export and
    checkpoint exchange while nothing happened) proves nothing new. Of the heads beyond the end
    of the log only the highest: it names the whole cut in one line.
    """
    unique: dict[tuple[str, int, str], SignedCheckpoint] = {}
    for checkpoint in checkpoints:
        unique.setdefault((checkpoint.org, checkpoint.sequence, checkpoint.head_hash), checkpoint)
    within = [cp for cp in unique.values() if cp.sequence <= head_sequence]
    beyond = [cp for cp in unique.values() if cp.sequence > head_sequence]
    within.sort(key=lambda cp: cp.sequence)
    if beyond:
        within.append(max(beyond, key=lambda cp: (cp.sequence, cp.signed_at_unix_ms)))
    return within


def verify_bundle(
    bundle: Bundle, verifier: Verifier | None, *, heads: Sequence[SignedCheckpoint] = ()
) -> VerifyReport:
    """Walk the bundle's chain (stubs by linkage) and check its checkpoints and any `heads`."""
    last = bundle.chain[-1].sequence if bundle.chain else 0
    if not bundle.chain and bundle.anchor is not None:
        last = bundle.anchor.sequence
    report = verify_chain(
        # verify_chain reads only sequence, prev_hash, record_hash and computed_hash(), which a
        # stub has: its linkage is checked, its hash taken as given.
        cast("list[AuditRecord]", bundle.chain),
        org=bundle.org,
        verifier=verifier,
        anchor=bundle.anchor,
        checkpoints=distinct_heads([*bundle.checkpoints, *heads], last),
    )
    if bundle.broken is not None:
        report.add(
            bundle.broken.sequence,
            f"exported with --allow-broken from a log that failed verification at record "
            f"{bundle.broken.sequence} ({bundle.broken.message}); no head was signed for it",
        )
    elif not bundle.checkpoints:
        report.add(
            report.head_sequence,
            "the bundle holds no signed checkpoint, so nothing proves who wrote it: export it "
            "again with `fedgate audit export`",
        )
    report.problems.sort(key=lambda problem: problem.sequence)
    return report
