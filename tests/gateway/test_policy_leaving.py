"""What leaves about a payload besides its released values: the paths of withheld and
transformed fields (they name only keys a rule names or the output shows), keys that leave as
pseudonyms, the scope of pseudonyms, and whether sub-task provenance may leave."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import PolicyError
from gateway.payload import canonical_json
from gateway.policy import paths, transforms
from gateway.policy.engine import Decision, InvokeDecision, Policy, load_policy

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MODEL = POLICIES / "model.conf"
KEY = bytes(range(32))
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def make_policy(tmp_path: Path, rules: str) -> Policy:
    path = tmp_path / "rules.csv"
    path.write_text(rules, encoding="utf-8")
    return load_policy(MODEL, path, pseudonym_key=KEY)


def share(*lines: str, peer: str = "insurer") -> str:
    return "".join(f"p, {peer}, records, summary, share, {line}\n" for line in lines)


def emitted(result: Any) -> list[str]:
    return [*result.withheld, *(path for path, _ in result.transformed)]


# -- paths name only keys a rule names --------------------------------------------------------


def test_a_withheld_key_that_is_data_is_not_named(tmp_path: Path) -> None:
    """Issue 11 #3: `hiv.078-05-1120` used to leave in field_actions and withheld_paths."""
    policy = make_policy(tmp_path, share("name, allow", "hiv, deny"))
    payload = {"name": "Ada", "hiv": {"078-05-1120": "positive", "123-45-6789": "negative"}}
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.output == {"name": "Ada"}
    assert result.withheld == ("hiv.*",)  # once, uncounted: how many ids it held is not told
    assert "078-05-1120" not in json.dumps(emitted(result))
    # the local preview still sees the concrete paths
    assert {d.path for d in result.decisions} == {
        "name",
        '["hiv"]'[2:-2] + ".078-05-1120",
        "hiv.123-45-6789",
    }


def test_default_deny_of_unnamed_top_level_keys_names_none(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, share("name, allow"))
    payload = {"name": "Ada", "078-05-1120": {"result": 1}, "secret_project_x": 2}
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.withheld == ("*",)


def test_the_send_side_reports_the_same_way(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "p, lab, tests, run, send, sample, allow\n")
    payload = {"sample": "S-1", "by_patient": {"P-778812": {"note": "x"}}}
    result = policy.filter("lab", "tests", "run", "send", payload)
    assert result.output == {"sample": "S-1"}
    assert result.withheld == ("*",)


def test_keys_under_an_allowed_wildcard_are_named_only_where_the_output_shows_them(
    tmp_path: Path,
) -> None:
    """Issue 11 #3: allowed subtrees under `*` emitted their keys verbatim. A key the released
    output shows is no news; a withheld entry's key is."""
    policy = make_policy(tmp_path, share("contacts.*, mask:4", "records.*.name, allow"))
    payload = {
        "contacts": {"alice": "555-0199-1234", "bob": "12"},  # bob's value is too short to mask
        "records": {"P-1": {"name": "Ada", "ssn": "1"}, "P-2": {"ssn": "2"}},
    }
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.output == {
        "contacts": {"alice": "*********1234"},
        "records": {"P-1": {"name": "Ada"}},
    }
    assert result.transformed == (("contacts.alice", "masked"),)  # alice is in the output
    assert result.withheld == ("contacts.*", "records.P-1.*", "records.*")
    text = json.dumps(emitted(result))
    assert "bob" not in text and "P-2" not in text and "ssn" not in text


def test_named_keys_stay_named_below_a_shown_key(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, share("records.*.name, allow", "records.*.ssn, deny"))
    payload = {"records": {"P-1": {"name": "Ada", "ssn": "1"}, "P-2": {"ssn": "2"}}}
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.withheld == ("records.P-1.ssn", "records.*")


def test_indices_stay_and_reported_paths_parse(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, share("items[].sku, allow"))
    payload = {"items": [{"sku": "A", "by_ssn": {"078": 1}}, {"lot": 3}]}
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.withheld == ("items[0].*", "items[1].*")
    assert [paths.parse_reported(p) for p in result.withheld] == [("items", 0, None)] * 1 + [
        ("items", 1, None)
    ]


def test_reported_path_grammar() -> None:
    assert paths.parse_reported("hiv.*") == ("hiv", None)
    assert paths.parse_reported('["a.b"][2].*') == ("a.b", 2, None)
    assert paths.render_concrete(("a", 0, None)) == "a[0].*"
    assert paths.render_key("*", first=True) == '["*"]'  # a payload key `*` is never bare
    with pytest.raises(paths.PathSyntaxError):
        paths.parse_reported("a.**")


# -- property: no withheld concrete key appears in any emitted path ---------------------------

VOCABULARY = ["a", "b", "c"]
_serial = itertools.count()


def data_key() -> st.SearchStrategy[str]:
    """Keys that are data: unique and distinctive, so finding one in a path means a leak."""
    return st.builds(lambda n: f"kd{next(_serial):07d}x{n}", st.integers(0, 99))


keys = st.one_of(st.sampled_from(VOCABULARY), data_key(), data_key())
leaves = st.sampled_from(["v1", "value two", 17, None, True, 2.5, "123456789"])
payloads = st.dictionaries(
    keys,
    st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=3)
        ),
        max_leaves=20,
    ),
    max_size=4,
)
segments = st.sampled_from([*VOCABULARY, "*", "**", "[]"])
patterns = st.builds(
    lambda first, rest: paths.render_pattern(
        paths.parse_pattern(".".join([first, *rest]).replace(".[]", "[]"))
    ),
    st.sampled_from([*VOCABULARY, "*", "**"]),
    st.lists(segments, max_size=3),
)


@st.composite
def rule_lines(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 5)) == 0:
        effect = draw(st.sampled_from(["pseudonymize", "allow"]))
        return f"p, insurer, records, summary, share, keys({draw(patterns)}), {effect}"
    effect = draw(
        st.sampled_from(["allow", "allow", "deny", "mask:4", "pseudonymize", "generalize:10"])
    )
    return f"p, insurer, records, summary, share, {draw(patterns)}, {effect}"


rule_files = st.lists(rule_lines(), max_size=8).map(lambda lines: "\n".join(lines) + "\n")


def all_keys(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, child in value.items():
            found.add(key)
            found |= all_keys(child)
    elif isinstance(value, list):
        for child in value:
            found |= all_keys(child)
    return found


@SETTINGS
@given(text=rule_files, payload=payloads, direction=st.sampled_from(["send", "share"]))
def test_no_withheld_concrete_key_appears_in_any_emitted_path(
    tmp_path: Path, text: str, payload: dict[str, Any], direction: str
) -> None:
    policy = make_policy(tmp_path, text.replace(", share,", f", {direction},"))
    result = policy.filter("insurer", "records", "summary", direction, payload)  # type: ignore[arg-type]
    shown = all_keys(result.output)
    told = canonical_json(emitted(result)).decode("utf-8")
    for key in all_keys(payload):
        if key.startswith("kd") and key not in shown:
            assert key not in told, (key, told)
    for path in emitted(result):  # every key in a path is a rule's word or shown in the output
        for segment in paths.parse_reported(path):
            if isinstance(segment, str):
                assert segment in VOCABULARY or segment in shown, (segment, path)
    # a hidden path stops at its first hidden key
    for path in result.withheld:
        parsed = paths.parse_reported(path)
        assert None not in parsed[:-1]
    assert len(set(result.withheld)) == len(result.withheld)
    withheld_leaves = [d for d in result.decisions if d.action == "withheld"]
    assert bool(withheld_leaves) == bool(result.withheld)
    if not result.withheld and not result.transformed:  # then the gateway reuses one digest
        assert canonical_json(result.output) == canonical_json(payload)


# -- keys that are data leave as pseudonyms ---------------------------------------------------

RESULTS = {
    "results": {
        "078-05-1120": {"test": "hba1c", "value": 6.1},
        "123-45-6789": {"test": "ldl", "value": 130},
    }
}


def test_keys_can_leave_as_pseudonyms(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path, share("keys(results), pseudonymize", "results.*.test, allow", peer="*")
    )
    result = policy.filter("insurer", "records", "summary", "share", RESULTS)
    entries = result.output["results"]
    assert len(entries) == 2 and all(transforms.PSEUDONYM.fullmatch(k) for k in entries)
    assert sorted(entry["test"] for entry in entries.values()) == ["hba1c", "ldl"]
    assert "078-05-1120" not in canonical_json(result.output).decode()
    told = json.dumps(emitted(result))
    assert "078-05-1120" not in told and "123-45-6789" not in told
    assert ("results.*", "pseudonymized") in result.transformed
    pseudonym = next(iter(entries))
    assert f"results.{pseudonym}.*" in result.withheld  # the value, under a shown pseudonym
    # stable for one peer, different for another
    again = policy.filter("insurer", "records", "summary", "share", RESULTS)
    assert again.output == result.output
    other = policy.filter("clinic", "records", "summary", "share", RESULTS)
    assert set(other.output["results"]).isdisjoint(entries)


def test_a_more_specific_keys_allow_beats_a_broad_pseudonymize(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path,
        share("keys(**), pseudonymize", "keys(codes), allow", "**, allow"),
    )
    payload = {"codes": {"J45": 1}, "by_ssn": {"078-05-1120": 2}}
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.output["codes"] == {"J45": 1}
    (pseudonym,) = result.output["by_ssn"]
    assert transforms.PSEUDONYM.fullmatch(pseudonym)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("keys(results), mask:4", "a keys(...) rule is pseudonymize[:SCOPE]"),
        ("keys(results..x), pseudonymize", "bad field pattern 'results..x' in"),
    ],
)
def test_bad_keys_rules_are_refused(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        make_policy(tmp_path, share(line))


# -- pseudonym scope --------------------------------------------------------------------------


def test_pseudonyms_differ_across_fields_skills_and_purposes(tmp_path: Path) -> None:
    """Issue 11 (low): one value gave one pseudonym for a peer in every field and skill."""
    policy = make_policy(
        tmp_path,
        "p, insurer, records, *, share, patient_id, pseudonymize\n"
        "p, insurer, records, *, share, member_id, pseudonymize\n",
    )

    def pseudonyms(skill: str, claims: Any = None) -> dict[str, Any]:
        payload = {"patient_id": "P-1", "member_id": "P-1"}
        return policy.filter("insurer", "records", skill, "share", payload, claims).output

    summary = pseudonyms("summary")
    assert summary["patient_id"] != summary["member_id"]  # across fields
    assert pseudonyms("audit")["patient_id"] != summary["patient_id"]  # across skills
    treatment = pseudonyms("summary", {"purpose": "treatment"})
    assert treatment["patient_id"] != summary["patient_id"]  # across purposes
    assert pseudonyms("summary", {"purpose": ["treatment"]}) == treatment  # stable
    assert pseudonyms("summary") == summary


def test_a_named_scope_links_pseudonyms_on_purpose(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path,
        "p, insurer, records, summary, share, patient.insurance_id, pseudonymize:insurance-id\n"
        "p, insurer, claims, check, send, patient.insurance_id, pseudonymize:insurance-id\n",
    )
    payload = {"patient": {"insurance_id": "INS-1"}}
    shared = policy.filter("insurer", "records", "summary", "share", payload).output
    sent = policy.filter("insurer", "claims", "check", "send", payload).output
    assert shared == sent
    assert transforms.PSEUDONYM.fullmatch(shared["patient"]["insurance_id"])
    other_peer = policy.filter("clinic", "records", "summary", "share", payload).output
    assert other_peer == {}


def test_released_value_agrees_with_the_filter_on_scoped_pseudonyms(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, share("a.b, pseudonymize"))
    claims = {"purpose": "billing"}
    out = policy.filter("insurer", "records", "summary", "share", {"a": {"b": "x"}}, claims)
    preview = policy.released_value("insurer", "records", "summary", "share", "a.b", "x", claims)
    assert out.output["a"]["b"] == preview


def test_bad_scope_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="pseudonymize takes a scope name"):
        make_policy(tmp_path, share("a, pseudonymize:Not OK"))


# -- @provenance ------------------------------------------------------------------------------


def test_provenance_is_default_deny_and_decided_by_its_own_rule(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path,
        "p, insurer, records, *, share, **, allow\n"
        "p, insurer, records, *, share, *, allow\n"
        "p, insurer, records, lab_summary, share, @provenance, allow\n"
        "p, insurer, records, audit, share, @provenance, allow, purpose=audit\n",
    )
    nothing = policy.may_share_provenance("insurer", "records", "summary")
    assert nothing == Decision(False, None, policy.version)  # `**` and `*` do not decide it
    yes = policy.may_share_provenance("insurer", "records", "lab_summary")
    assert yes.allowed and yes.rule is not None and "@provenance" in yes.rule
    assert not policy.may_share_provenance("clinic", "records", "lab_summary").allowed
    assert not policy.may_share_provenance("insurer", "records", "audit").allowed
    assert policy.may_share_provenance("insurer", "records", "audit", {"purpose": "audit"}).allowed
    assert InvokeDecision is Decision


def test_a_payload_key_named_provenance_is_an_ordinary_field(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, share("@provenance, allow", "name, allow"))
    payload = {"@provenance": "secret", "name": "Ada"}
    result = policy.filter("insurer", "records", "summary", "share", payload)
    assert result.output == {"name": "Ada"}
    assert result.withheld == ("*",)
    quoted = make_policy(tmp_path, share('["@provenance"], allow'))
    assert quoted.filter("insurer", "records", "summary", "share", payload).output == {
        "@provenance": "secret"
    }
    assert not quoted.may_share_provenance("insurer", "records", "summary").allowed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("p, insurer, records, summary, send, @provenance, allow", "share rules only"),
        ("p, insurer, records, summary, share, @provenance, mask", "is allow or deny"),
        ("p, insurer, records, summary, share, a.@provenance, allow", "reserved name"),
        ("p, insurer, records, summary, share, @provenance.x, allow", "reserved name"),
    ],
)
def test_provenance_is_accepted_only_as_a_whole_share_field(
    tmp_path: Path, line: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        make_policy(tmp_path, line + "\n")
