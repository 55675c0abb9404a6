"""The sharing policy engine: the demo policies as data, precedence, transforms, errors, reload."""

from __future__ import annotations

import asyncio
import logging
import stat
import threading
import time
from pathlib import Path
from typing import Any

import casbin
import pytest

from gateway.errors import InvalidArgument, PayloadLimitExceeded, PolicyError
from gateway.policy import paths, transforms
from gateway.policy.engine import (
    FilterResult,
    Policy,
    PolicyHolder,
    load_or_create_pseudonym_key,
    load_policy,
)

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MODEL = POLICIES / "model.conf"
KEY = bytes(range(32))
PSEUDONYM = "<pseudonym>"


def make_policy(tmp_path: Path, rules: str, name: str = "rules.csv", **kwargs: Any) -> Policy:
    path = tmp_path / name
    path.write_text(rules, encoding="utf-8")
    return load_policy(MODEL, path, pseudonym_key=KEY, **kwargs)


def placeholders(value: Any) -> Any:
    """Pseudonyms replaced by a placeholder, so expectations do not depend on the key."""
    if isinstance(value, dict):
        return {k: placeholders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [placeholders(v) for v in value]
    if isinstance(value, str) and transforms.PSEUDONYM.fullmatch(value):
        return PSEUDONYM
    return value


@pytest.fixture(scope="module")
def hospital() -> Policy:
    return load_policy(
        MODEL,
        POLICIES / "hospital.csv",
        pseudonym_key=KEY,
        known_agents={"records": ["summary", "lab_summary"], "triage": ["assess"]},
    )


@pytest.fixture(scope="module")
def insurer() -> Policy:
    return load_policy(
        MODEL,
        POLICIES / "insurer.csv",
        pseudonym_key=KEY,
        known_agents={"claims": ["check", "review"]},
    )


SUMMARY = {
    "patient": {
        "name": "Ada Lovelace",
        "date_of_birth": "1984-05-17",
        "ssn": "123-45-6789",
        "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"},
        "insurance_id": "INS-99812",
    },
    "diagnoses": [
        {"code": "J45.909", "description": "Asthma", "date": "2024-02-03"},
        {"code": "E11.9", "description": "Type 2 diabetes", "date": "2023-11-30T10:15:00"},
    ],
    "treatment_cost": 1830.5,
    "notes": "call back after 5pm",
}
SUMMARY_FOR_INSURER = {
    "patient": {
        "date_of_birth": "1984",
        "ssn": "*******6789",
        "address": {"city": "Springfield", "zip": "12345"},
        "insurance_id": PSEUDONYM,
    },
    "diagnoses": [{"code": "J45.909", "date": "2024"}, {"code": "E11.9", "date": "2023"}],
    "treatment_cost": 1830.5,
}
CLAIM = {
    "claim": {"amount": 1830.5, "procedure_code": "99213", "diagnosis_code": "J45.909"},
    "patient": {
        "name": "Ada",
        "ssn": "123-45-6789",
        "insurance_id": "INS-99812",
        "date_of_birth": "1984-05-17",
    },
}
DECISION = {
    "approved": True,
    "covered_amount": 1500,
    "reason_code": "COVERED-80",
    "fraud_score": 0.07,
    "internal": {"reviewer": "j.smith"},
}

# (policy, peer, agent, skill, direction, payload, claims) -> what leaves
LEAVES = [
    pytest.param(
        "hospital",
        "insurer",
        "records",
        "summary",
        "share",
        SUMMARY,
        None,
        SUMMARY_FOR_INSURER,
        id="summary-to-insurer",
    ),
    pytest.param(
        "hospital",
        "insurer",
        "records",
        "summary",
        "share",
        {"diagnoses": [{"code": "A", "description": "flu"}]},
        {"purpose": "treatment"},
        {"diagnoses": [{"code": "A", "description": "flu"}]},
        id="treatment-claim",
    ),
    pytest.param(
        "hospital",
        "insurer",
        "records",
        "summary",
        "share",
        {"diagnoses": [{"code": "A", "description": "flu"}]},
        {"purpose": ["billing", "treatment"]},
        {"diagnoses": [{"code": "A", "description": "flu"}]},
        id="claim-list",
    ),
    pytest.param(
        "hospital",
        "insurer",
        "records",
        "summary",
        "share",
        {"diagnoses": [{"code": "A", "description": "flu"}]},
        {"purpose": "billing"},
        {"diagnoses": [{"code": "A"}]},
        id="other-purpose",
    ),
    pytest.param(
        "hospital",
        "clinic",
        "records",
        "summary",
        "share",
        SUMMARY,
        None,
        {},
        id="unknown-peer-gets-nothing",
    ),
    pytest.param(
        "hospital",
        "insurer",
        "triage",
        "assess",
        "share",
        SUMMARY,
        None,
        {},
        id="other-agent-shares-nothing",
    ),
    pytest.param(
        "hospital",
        "insurer",
        "records",
        "summary",
        "send",
        SUMMARY,
        None,
        {},
        id="share-rules-do-not-cover-send",
    ),
    pytest.param(
        "hospital",
        "insurer",
        "claims",
        "check",
        "send",
        CLAIM,
        None,
        {"claim": CLAIM["claim"], "patient": {"insurance_id": PSEUDONYM, "date_of_birth": "1984"}},
        id="claim-to-insurer",
    ),
    pytest.param(
        "insurer",
        "hospital",
        "claims",
        "check",
        "share",
        DECISION,
        None,
        {"approved": True, "covered_amount": 1500, "reason_code": "COVERED-80"},
        id="decision-to-hospital",
    ),
    pytest.param(
        "insurer",
        "clinic",
        "claims",
        "check",
        "share",
        DECISION,
        None,
        {},
        id="decision-to-stranger",
    ),
]


@pytest.mark.parametrize(
    ("which", "peer", "agent", "skill", "direction", "payload", "claims", "expected"), LEAVES
)
def test_what_leaves(
    request: pytest.FixtureRequest,
    which: str,
    peer: str,
    agent: str,
    skill: str,
    direction: Any,
    payload: dict[str, Any],
    claims: Any,
    expected: dict[str, Any],
) -> None:
    policy: Policy = request.getfixturevalue(which)
    result = policy.filter(peer, agent, skill, direction, payload, claims)
    assert placeholders(result.output) == expected
    assert result.policy_version == policy.version


INVOKES = [
    ("hospital", "insurer", "records", "summary", True),
    ("hospital", "insurer", "records", "other", False),
    ("hospital", "insurer", "triage", "assess", False),
    ("hospital", "clinic", "records", "summary", False),
    ("insurer", "hospital", "claims", "check", True),
    ("insurer", "insurer", "claims", "check", False),
]


@pytest.mark.parametrize(("which", "peer", "agent", "skill", "allowed"), INVOKES)
def test_may_invoke(
    request: pytest.FixtureRequest, which: str, peer: str, agent: str, skill: str, allowed: bool
) -> None:
    decision = request.getfixturevalue(which).may_invoke(peer, agent, skill)
    assert decision.allowed is allowed


def test_summary_decisions_name_paths_actions_and_rules(hospital: Policy) -> None:
    result = hospital.filter("insurer", "records", "summary", "share", SUMMARY)
    actions = {d.path: d.action for d in result.decisions}
    assert actions == {
        "patient.name": "withheld",
        "patient.date_of_birth": "generalized",
        "patient.ssn": "masked",
        "patient.address.street": "withheld",
        "patient.address.city": "allowed",
        "patient.address.zip": "allowed",
        "patient.insurance_id": "pseudonymized",
        "diagnoses[0].code": "allowed",
        "diagnoses[0].description": "withheld",
        "diagnoses[0].date": "generalized",
        "diagnoses[1].code": "allowed",
        "diagnoses[1].description": "withheld",
        "diagnoses[1].date": "generalized",
        "treatment_cost": "allowed",
        "notes": "withheld",
    }
    assert set(result.withheld) == {p for p, a in actions.items() if a == "withheld"}
    assert dict(result.transformed) == {
        p: a for p, a in actions.items() if a not in ("allowed", "withheld")
    }
    rules = {d.path: d.rule for d in result.decisions}
    assert rules["diagnoses[0].description"] is None  # default deny
    assert rules["patient.ssn"] is not None
    assert rules["patient.ssn"].startswith("policies/hospital.csv:")
    assert rules["patient.ssn"].endswith("patient.ssn, mask:4")


def test_demo_policies_have_no_warnings(hospital: Policy, insurer: Policy) -> None:
    assert hospital.warnings == ()
    assert insurer.warnings == ()


def test_rules_read_like_casbins_own_file_adapter() -> None:
    """What we parse from a rules file is exactly what Casbin's file adapter reads."""
    for name in ("hospital.csv", "insurer.csv", "lab.csv"):
        ours = load_policy(MODEL, POLICIES / name, pseudonym_key=KEY)
        enforcer = casbin.Enforcer(str(MODEL), str(POLICIES / name))
        theirs = {tuple(rule + [""] * (7 - len(rule))) for rule in enforcer.get_policy()}
        assert {rule.values for rule in ours.rules} == theirs


# -- paths and precedence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "covered"),
    [
        ("patient.address.zip", "patient.address.zip", True),
        ("patient.address", "patient.address.zip", True),
        ("patient.address.zip", "patient.address", False),
        ("patient.*", "patient.address.zip", True),
        ("patient.*", "patient", False),
        ("*.zip", "patient.zip", True),
        ("*", "items[].price", True),
        ("items.*", "items[].price", False),
        ("items[].price", "items[].price", True),
        ("items[]", "items[].price", True),
        ("**", "a", True),
        ("**.ssn", "ssn", True),
        ("**.ssn", "a.b[].ssn", True),
        ("**.ssn", "a.ssnx", False),
        ("a.**.z", "a.z", True),
        ("a.**.z", "a.b.c.z.d", True),
        ('["a.b"]', '["a.b"].c', True),
        ('["a.b"]', "a.b", False),
    ],
)
def test_covers(pattern: str, path: str, covered: bool) -> None:
    assert paths.covers(paths.parse_pattern(pattern), paths.parse_normalized(path)) is covered


def test_precedence_order_of_the_readme() -> None:
    documented = [
        "patient.address.zip",
        "patient.address.*",
        "patient.address",
        "patient.*.zip",
        "patient.*",
        "patient",
        "**.zip",
        "**",
    ]
    ranked = sorted(documented[::-1], key=lambda p: paths.sort_key(paths.parse_pattern(p)))
    assert ranked == documented


@pytest.mark.parametrize(
    "bad",
    ["", "a..b", "a.", ".a", "[]", "[].a", "a[0]", "a b", "a.***", "a*", "a[x]", '["a'],
)
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(paths.PathSyntaxError):
        paths.parse_pattern(bad)


def test_keys_with_dots_cannot_pose_as_nested_paths(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "p, *, a, s, share, patient.name, allow\n")
    result = policy.filter(
        "x", "a", "s", "share", {"patient.name": "secret", "patient": {"name": "ok"}}
    )
    assert result.output == {"patient": {"name": "ok"}}
    assert result.withheld == ("*",)  # no rule names the key "patient.name": it is not named
    named = make_policy(
        tmp_path,
        'p, *, a, s, share, patient.name, allow\np, *, a, s, share, ["patient.name"], deny\n',
    )
    result = named.filter("x", "a", "s", "share", {"patient.name": "secret"})
    assert result.withheld == ('["patient.name"]',)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        # a more specific allow beats a broader deny, and vice versa
        (["patient, deny", "patient.city, allow"], {"patient": {"city": "Paris"}}),
        (["patient, allow", "patient.ssn, deny"], {"patient": {"city": "Paris"}}),
        # a literal beats `*`, which beats `**`
        (["patient.*, allow", "patient.ssn, deny"], {"patient": {"city": "Paris"}}),
        (["**, deny", "patient.*, allow"], {"patient": {"city": "Paris", "ssn": "123456789"}}),
        (["**.ssn, deny", "patient, allow"], {"patient": {"city": "Paris", "ssn": "123456789"}}),
        # equal specificity: the most restrictive effect wins
        (["patient, allow", "patient, deny"], {}),
        (["patient.ssn, allow", "patient.ssn, mask:2"], {"patient": {"ssn": "*******89"}}),
        (["patient.ssn, mask:4", "patient.ssn, mask:2"], {"patient": {"ssn": "*******89"}}),
        (["patient.ssn, mask:4", "patient.ssn, deny"], {}),
    ],
)
def test_precedence(tmp_path: Path, rules: list[str], expected: dict[str, Any]) -> None:
    text = "".join(f"p, insurer, a, s, share, {rule}\n" for rule in rules)
    policy = make_policy(tmp_path, text)
    payload = {"patient": {"city": "Paris", "ssn": "123456789"}}
    assert policy.filter("insurer", "a", "s", "share", payload).output == expected


def test_peer_specific_and_wildcard_rules_compete_on_effect(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path, "p, insurer, a, s, share, x, allow\np, *, *, *, share, x, deny\n"
    )
    assert policy.filter("insurer", "a", "s", "share", {"x": 1}).output == {}


def test_invoke_rules(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path, "p, *, a, *, invoke, *, allow\np, clinic, a, s, invoke, , deny\n"
    )
    assert policy.may_invoke("insurer", "a", "s").allowed
    assert not policy.may_invoke("clinic", "a", "s").allowed
    assert policy.may_invoke("clinic", "a", "t").allowed
    assert not policy.may_invoke("clinic", "b", "s").allowed
    assert policy.may_invoke("clinic", "b", "s").rule is None


# -- conditions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "claims", "shared"),
    [
        ("", None, True),
        ("purpose=treatment", None, False),
        ("purpose=treatment", {"purpose": "treatment"}, True),
        ("purpose=treatment", {"purpose": "research"}, False),
        ("purpose=treatment", {"purpose": ["research", "treatment"]}, True),
        ("role!=intern", None, False),  # an absent claim fails every condition
        ("role!=intern", {"role": []}, False),
        ("role!=intern", {"role": ""}, False),
        ("role!=intern", {"role": None}, False),
        ("role!=intern", {"role": ["doctor", "intern"]}, False),
        ("role!=intern", {"role": ["doctor", "nurse"]}, True),
        ("origin!=insurer", {}, False),
        ("origin!=insurer", {"origin": ("hospital",)}, True),
        ("origin!=insurer", {"origin": ("hospital", "insurer")}, False),
        ("origin=hospital", {"origin": ("lab", "hospital")}, True),
        ("origin=hospital", {"origin": ()}, False),
        ("role!=intern", {"role": "intern"}, False),
        ("role!=intern", {"role": "doctor"}, True),
        ("purpose=treatment & role=doctor", {"purpose": "treatment", "role": "doctor"}, True),
        ("purpose=treatment & role=doctor", {"purpose": "treatment", "role": "nurse"}, False),
        ("role=claims-adjuster", {"role": ("claims-adjuster",)}, True),
    ],
)
def test_conditions_over_claims(tmp_path: Path, condition: str, claims: Any, shared: bool) -> None:
    policy = make_policy(tmp_path, f"p, insurer, a, s, share, x, allow, {condition}\n")
    result = policy.filter("insurer", "a", "s", "share", {"x": "v"}, claims)
    assert (result.output == {"x": "v"}) is shared
    assert policy.may_invoke("insurer", "a", "s", claims).allowed is False


def test_memo_does_not_mix_up_claims(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "p, insurer, a, s, share, x, allow, purpose=treatment\n")
    for _ in range(3):
        assert policy.filter(
            "insurer", "a", "s", "share", {"x": 1}, {"purpose": "treatment"}
        ).output == {"x": 1}
        assert policy.filter("insurer", "a", "s", "share", {"x": 1}).output == {}


# -- transforms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("effect", "value", "released"),
    [
        ("mask", "123-45-6789", "*******6789"),
        ("mask:2", 123456, "****56"),
        ("mask:0", "abc", "***"),
        ("mask:4", "1234", None),  # nothing to hide
        ("mask:2", "***", None),  # masking would not change it
        ("mask", True, None),
        ("mask", None, None),
        ("generalize:year", "1984-05-17", "1984"),
        ("generalize", "2023-11-30T10:15:00+01:00", "2023"),
        ("generalize:year", "not a date", None),
        ("generalize:year", 1984, None),
        ("generalize:10", 42, "40-49"),
        ("generalize:10", 49.9, "40-49"),
        ("generalize:5", -3, "-5--1"),
        ("generalize:10", "42", None),
        ("generalize:10", False, None),
        ("pseudonymize", None, None),
        ("pseudonymize", [1], None),
    ],
)
def test_transforms(effect: str, value: Any, released: Any) -> None:
    assert transforms.apply(transforms.parse_effect(effect), value, KEY, "insurer") == released


def test_pseudonyms_are_stable_per_peer_and_unlinkable_across_peers() -> None:
    first = transforms.pseudonymize("INS-99812", KEY, "insurer")
    assert first == transforms.pseudonymize("INS-99812", KEY, "insurer")
    assert first is not None and transforms.PSEUDONYM.fullmatch(first)
    assert first != transforms.pseudonymize("INS-99812", KEY, "clinic")
    assert first != transforms.pseudonymize("INS-99812", bytes(32), "insurer")
    assert transforms.pseudonymize(7, KEY, "insurer") != transforms.pseudonymize(
        "7", KEY, "insurer"
    )


def test_transform_that_cannot_apply_withholds(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "p, insurer, a, s, share, **, generalize:year\n")
    payload = {"born": "1990-01-02", "n": 5, "obj": {}, "tags": ["2001-02-03", "x"]}
    result = policy.filter("insurer", "a", "s", "share", payload)
    assert result.output == {"born": "1990", "tags": ["2001"]}
    # no rule names `n` or `obj` (`**` names nothing); `tags` shows in the output
    assert set(result.withheld) == {"*", "tags[1]"}


def test_empty_containers_and_pruning(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path,
        "p, insurer, a, s, share, keep, allow\np, insurer, a, s, share, list[].keep, allow\n",
    )
    payload = {"keep": {}, "drop": {"x": 1}, "list": [{"drop": 1}, {"keep": 2}, {"keep": []}]}
    result = policy.filter("insurer", "a", "s", "share", payload)
    assert result.output == {"keep": {}, "list": [{"keep": 2}, {"keep": []}]}
    assert result.withheld == ("*", "list[0].*")


# -- errors and warnings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "p, insurer, a, s, share, x, maskk",
            "rules.csv:2: unknown effect 'maskk' (use allow, deny, mask[:N], pseudonymize[:SCOPE], "
            "generalize[:year|N])",
        ),
        ("p, insurer, a, s, share, x", "rules.csv:2: expected 6 or 7 fields"),
        ("g, alice, admin", "rules.csv:2: unknown line type 'g'"),
        ("p, insurer, a, s, leak, x, allow", "rules.csv:2: unknown direction 'leak'"),
        ("p, insurer, a, s, share, a..b, allow", "rules.csv:2: bad field pattern 'a..b'"),
        ("p, insurer, a, s, share, , allow", "rules.csv:2: a send or share rule names a field"),
        ("p, insurer, a, s, invoke, x, allow", "rules.csv:2: an invoke rule names no field"),
        ("p, insurer, a, s, invoke, *, mask", "rules.csv:2: an invoke rule is allow or deny"),
        ("p, Insurer!, a, s, share, x, allow", "rules.csv:2: peer 'Insurer!'"),
        ("p, insurer, a, s, share, x, mask:x", "rules.csv:2: mask takes"),
        ("p, insurer, a, s, share, x, generalize:0", "rules.csv:2: generalize takes"),
        ("p, insurer, a, s, share, x, allow, purpose", "rules.csv:2: malformed condition"),
        ("p, insurer, a, s, share, x[, allow", "rules.csv:2: unbalanced brackets"),
    ],
)
def test_broken_rules_are_refused_with_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as caught:
        make_policy(tmp_path, f"p, insurer, a, s, share, ok, allow\n{line}\n")
    assert caught.value.message.startswith(message)


def test_every_problem_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError, match=r"^rules.csv:1: .*\(and 1 more: run `fedgate policy"):
        make_policy(tmp_path, "p, a, b\np, c, d\n")


def test_missing_files_and_a_foreign_model(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="rules file not found"):
        load_policy(MODEL, tmp_path / "missing.csv", pseudonym_key=KEY)
    model = tmp_path / "model.conf"
    model.write_text(
        MODEL.read_text().replace("priority(p.eft) || deny", "some(where (p.eft == allow))")
    )
    (tmp_path / "r.csv").write_text("")
    with pytest.raises(PolicyError, match="policy_effect e differs"):
        load_policy(model, tmp_path / "r.csv", pseudonym_key=KEY)
    model.write_text("[request_definition]\nr = sub\n")
    with pytest.raises(PolicyError, match=r"differs from the model Fedgate compiles|not a valid"):
        load_policy(model, tmp_path / "r.csv", pseudonym_key=KEY)


def test_unknown_agents_and_peers_are_warnings(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path,
        "p, insurer, ghost, s, share, x, allow\n"
        "p, insurer, records, nope, invoke, *, allow\n"
        "p, insurer, remote, thing, send, x, allow\n"  # send names the peer's agent: no warning
        "p, stranger, records, summary, invoke, *, allow\n"
        "p, stranger, records, summary, invoke, *, allow\n",
        known_agents={"records": ["summary"]},
        known_peers={"insurer"},
    )
    assert len(policy.warnings) == 4
    assert (
        "rules.csv:1: rule names agent 'ghost' which this gateway does not have"
        in (policy.warnings[0])
    )
    assert "rule names skill 'records.nope'" in policy.warnings[1]
    assert "rule names peer 'stranger' which is not a peer of this gateway" in policy.warnings[2]
    assert "rules.csv:5: duplicates line 4" in policy.warnings[3]


def test_version_changes_with_the_rules(tmp_path: Path) -> None:
    one = make_policy(tmp_path, "p, insurer, a, s, share, x, allow\n")
    same = make_policy(tmp_path, "p, insurer, a, s, share, x, allow\n")
    other = make_policy(tmp_path, "p, insurer, a, s, share, x, deny\n")
    assert one.version == same.version != other.version
    assert one.version.startswith("sha256:") and len(one.version) == 7 + 64


# -- payloads that cannot be evaluated -----------------------------------------------------------


def test_deep_payload_is_refused_quickly(hospital: Policy) -> None:
    payload: dict[str, Any] = {}
    node = payload
    for _ in range(10_000):
        node["a"] = {}
        node = node["a"]
    started = time.perf_counter()
    with pytest.raises(PayloadLimitExceeded, match="nested deeper than 32"):
        hospital.filter("insurer", "records", "summary", "share", payload)
    assert time.perf_counter() - started < 1.0


def test_wide_payload_is_refused_quickly(hospital: Policy) -> None:
    payload = {"notes": [f"n{i}" for i in range(100_000)]}
    started = time.perf_counter()
    with pytest.raises(PayloadLimitExceeded, match="more than 10000 fields"):
        hospital.filter("insurer", "records", "summary", "share", payload)
    assert time.perf_counter() - started < 1.0


def test_limits_are_the_callers(hospital: Policy) -> None:
    payload = {"patient": {"address": {"city": "x"}}}
    with pytest.raises(PayloadLimitExceeded):
        hospital.filter("insurer", "records", "summary", "share", payload, max_depth=2)
    with pytest.raises(PayloadLimitExceeded):
        hospital.filter("insurer", "records", "summary", "share", payload, max_fields=2)


@pytest.mark.parametrize(
    "payload", [{"x": {1, 2}}, {"x": float("nan")}, {"x": b"bytes"}, {1: "x"}, ["x"]]
)
def test_values_json_cannot_carry_are_refused(tmp_path: Path, payload: Any) -> None:
    policy = make_policy(tmp_path, "p, *, a, s, share, **, allow\n")
    with pytest.raises(InvalidArgument):
        policy.filter("insurer", "a", "s", "share", payload)


def test_direction_must_be_send_or_share(hospital: Policy) -> None:
    with pytest.raises(InvalidArgument, match="direction 'invoke'"):
        hospital.filter("insurer", "records", "summary", "invoke", {})  # type: ignore[arg-type]


# -- pseudonym key --------------------------------------------------------------------------------


def test_pseudonym_key_is_created_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "pseudonym.key"
    key = load_or_create_pseudonym_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_pseudonym_key(path) == key
    path.write_bytes(b"short")
    with pytest.raises(PolicyError, match="must hold 32 bytes"):
        load_or_create_pseudonym_key(path)


# -- reload ----------------------------------------------------------------------------------------

RULES_A = "p, insurer, a, s, share, patient, allow\np, insurer, a, s, share, patient.ssn, mask:4\n"
RULES_B = (
    "p, insurer, a, s, share, patient.city, allow\np, insurer, a, s, share, patient.ssn, deny\n"
)
PAYLOAD = {"patient": {"city": "Paris", "ssn": "123-45-6789", "name": "Ada"}}


def test_broken_reload_keeps_serving_the_old_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "rules.csv"
    rules.write_text(RULES_A)
    holder = PolicyHolder(lambda: load_policy(MODEL, rules, pseudonym_key=KEY))
    old = holder.current
    rules.write_text(RULES_A + "p, insurer, a, s, share, patient.name, maskk\n")
    with (
        caplog.at_level(logging.WARNING, logger="fedgate.policy"),
        pytest.raises(PolicyError, match=r"rules.csv:3: unknown effect 'maskk'"),
    ):
        holder.reload()
    assert holder.current is old
    assert "policy reload refused" in caplog.text and "rules.csv:3" in caplog.text
    rules.write_text(RULES_B)
    assert holder.reload() is holder.current
    assert holder.current.version != old.version


def test_reload_under_concurrent_use_is_atomic(tmp_path: Path) -> None:
    files = {"a": tmp_path / "a.csv", "b": tmp_path / "b.csv"}
    files["a"].write_text(RULES_A)
    files["b"].write_text(RULES_B)
    which = {"name": "a"}
    holder = PolicyHolder(lambda: load_policy(MODEL, files[which["name"]], pseudonym_key=KEY))
    expected: dict[str, FilterResult] = {}
    for name in ("a", "b"):
        policy = load_policy(MODEL, files[name], pseudonym_key=KEY)
        expected[policy.version] = policy.filter("insurer", "a", "s", "share", PAYLOAD)
    assert len(expected) == 2
    stop = threading.Event()
    failures: list[str] = []
    seen: set[str] = set()

    def reloader() -> None:
        while not stop.is_set():
            which["name"] = "b" if which["name"] == "a" else "a"
            holder.reload()

    def worker() -> None:
        while not stop.is_set():
            result = holder.current.filter("insurer", "a", "s", "share", PAYLOAD)
            seen.add(result.policy_version)
            if result != expected.get(result.policy_version):
                failures.append(repr(result))

    threads = [threading.Thread(target=reloader)] + [
        threading.Thread(target=worker) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures
    assert seen == set(expected)


async def test_reload_while_tasks_filter(tmp_path: Path) -> None:
    files = {"a": tmp_path / "a.csv", "b": tmp_path / "b.csv"}
    files["a"].write_text(RULES_A)
    files["b"].write_text(RULES_B)
    which = {"name": "a"}
    holder = PolicyHolder(lambda: load_policy(MODEL, files[which["name"]], pseudonym_key=KEY))
    expected = {}
    for name in ("a", "b"):
        policy = load_policy(MODEL, files[name], pseudonym_key=KEY)
        expected[policy.version] = policy.filter("insurer", "a", "s", "share", PAYLOAD)

    async def task() -> None:
        for _ in range(200):
            result = holder.current.filter("insurer", "a", "s", "share", PAYLOAD)
            assert result == expected[result.policy_version]
            await asyncio.sleep(0)

    async def reloads() -> None:
        for _ in range(40):
            which["name"] = "b" if which["name"] == "a" else "a"
            await asyncio.to_thread(holder.reload)

    await asyncio.gather(reloads(), *(task() for _ in range(10)))


async def test_watch_reloads_on_change_and_refuses_broken_files(tmp_path: Path) -> None:
    rules = tmp_path / "rules.csv"
    rules.write_text(RULES_A)
    holder = PolicyHolder(lambda: load_policy(MODEL, rules, pseudonym_key=KEY))
    first = holder.current
    watcher = asyncio.create_task(holder.watch([MODEL, rules], interval=0.02))
    try:
        rules.write_text("p, insurer, a, s, share, x, allow,, extra\n")
        await asyncio.sleep(0.2)
        assert holder.current is first
        rules.write_text(RULES_B)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if holder.current is not first:
                break
        assert holder.current.version != first.version
        assert holder.current.filter("insurer", "a", "s", "share", PAYLOAD).output == {
            "patient": {"city": "Paris"}
        }
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


def test_depth_beyond_the_recursion_limit_is_refused_not_passed(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "p, *, a, s, share, **, allow\n")
    payload: dict[str, Any] = {}
    node = payload
    for _ in range(995):
        node["k"] = {}
        node = node["k"]
    node["k"] = "leaf"
    with pytest.raises(PayloadLimitExceeded, match="too deep for this gateway"):
        policy.filter("insurer", "a", "s", "share", payload, max_depth=1000)
