"""Property tests of the policy engine: nothing withheld leaks, transforms change values,
pseudonyms behave, and the compiled decisions always equal Casbin's own."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from fedgate.convert import dict_to_struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.payload import canonical_json
from gateway.policy import paths, transforms
from gateway.policy.engine import Policy, load_policy

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MODEL = POLICIES / "model.conf"
KEY = bytes(range(32))

KEYS = ["a", "b", "c", "odd.key", "@provenance"]
PEERS = ["insurer", "clinic"]
AGENTS = ["records", "claims"]
SKILLS = ["summary", "check"]
EFFECTS = ["allow", "deny", "mask", "mask:2", "pseudonymize", "generalize:year", "generalize:10"]
CONDITIONS = [
    "",
    "purpose=treatment",
    "role!=intern",
    "purpose=research & role=doctor",
    "origin!=insurer",
    "origin=hospital & role!=doctor",
]
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_counter = itertools.count()


def render_pattern(segments: list[str]) -> str:
    text = ""
    for segment in segments:
        if segment == "[]":
            text += "[]"
        elif segment in ("*", "**"):
            text += ("." if text else "") + segment
        else:
            text += paths.render_key(segment, first=not text)
    return text


patterns = st.builds(
    lambda first, rest: render_pattern([first, *rest]),
    st.sampled_from([*KEYS, "*", "**"]),
    st.lists(st.sampled_from([*KEYS, "*", "**", "[]"]), max_size=3),
)


@st.composite
def rules(draw: st.DrawFn) -> str:
    direction = draw(st.sampled_from(["invoke", "send", "share"]))
    peer = draw(st.sampled_from([*PEERS, "*"]))
    agent = draw(st.sampled_from([*AGENTS, "*"]))
    skill = draw(st.sampled_from([*SKILLS, "*"]))
    condition = draw(st.sampled_from(CONDITIONS))
    target = draw(st.sampled_from(["fields", "fields", "keys", "provenance"]))
    if direction == "invoke":
        effect = draw(st.sampled_from(["allow", "deny"]))
        field = draw(st.sampled_from(["*", ""]))
    elif target == "keys":
        effect = draw(st.sampled_from(["allow", "pseudonymize", "pseudonymize:ids"]))
        field = f"keys({draw(patterns)})"
    elif target == "provenance" and direction == "share":
        effect = draw(st.sampled_from(["allow", "deny"]))
        field = "@provenance"
    else:
        effect = draw(st.sampled_from(EFFECTS))
        field = draw(patterns)
    return f"p, {peer}, {agent}, {skill}, {direction}, {field}, {effect}, {condition}"


rule_files = st.lists(rules(), min_size=0, max_size=25).map(lambda lines: "\n".join(lines) + "\n")


@st.composite
def share_rules(draw: st.DrawFn) -> str:
    """Rules aimed at insurer <- records.summary share, so that most of them apply."""
    peer = draw(st.sampled_from(["insurer", "*", "clinic"]))
    agent = draw(st.sampled_from(["records", "*"]))
    condition = draw(st.sampled_from(["", "", "", *CONDITIONS]))
    effect = draw(st.sampled_from(["allow", "allow", *EFFECTS]))
    return f"p, {peer}, {agent}, summary, share, {draw(patterns)}, {effect}, {condition}"


share_rule_files = st.lists(share_rules(), max_size=15).map(lambda lines: "\n".join(lines) + "\n")

CLAIM_VALUES = ["treatment", "research", "intern", "doctor", "hospital", "insurer", ""]
claims = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["purpose", "role", "origin", "unused"]),
        st.one_of(
            st.none(),
            st.sampled_from(CLAIM_VALUES),
            st.lists(st.sampled_from(CLAIM_VALUES), max_size=2),
            st.lists(st.sampled_from(CLAIM_VALUES), max_size=2).map(tuple),
        ),
        max_size=4,
    ),
)


def unique_text() -> st.SearchStrategy[str]:
    """Distinctive strings (unique prefix, 12+ characters) so a search for them means something."""
    return st.builds(
        lambda n, tail: f"wv{next(_counter):06d}-{n:04d}{tail}",
        st.integers(0, 9999),
        st.text("xyz ", max_size=4),
    )


leaves = st.one_of(unique_text(), unique_text(), st.sampled_from([None, True, 17, 2.5]))
payloads = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=25,
).filter(lambda value: isinstance(value, dict))


def load(tmp_path: Path, text: str, name: str = "rules.csv") -> Policy:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_policy(MODEL, path, pseudonym_key=KEY)


def leaf_paths(value: Any, concrete: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        found = []
        for key, child in value.items():
            found += leaf_paths(child, concrete + paths.render_key(key, first=not concrete))
        return found
    if isinstance(value, list) and value:
        return [
            item for i, child in enumerate(value) for item in leaf_paths(child, f"{concrete}[{i}]")
        ]
    return [(concrete, value)] if concrete else []


@SETTINGS
@given(text=share_rule_files, payload=payloads, claims=claims)
def test_no_withheld_or_transformed_value_leaves(
    tmp_path: Path, text: str, payload: dict[str, Any], claims: Any
) -> None:
    peer, direction = "insurer", "share"
    policy = load(tmp_path, text)
    result = policy.filter(peer, "records", "summary", direction, payload, claims)
    as_json = canonical_json(result.output).decode("utf-8")
    as_struct = dict_to_struct(result.output).SerializeToString()
    originals = dict(leaf_paths(payload))
    decided = {d.path for d in result.decisions}
    assert decided == set(originals)  # every leaf decided, exactly once
    assert len(result.decisions) == len(originals)
    hidden = [d.path for d in result.decisions if d.action != "allowed"]
    assert bool(hidden) == bool(result.withheld or result.transformed)
    transformed = [d.path for d in result.decisions if d.action not in ("allowed", "withheld")]
    for path in hidden:
        value = originals[path]
        if isinstance(value, str) and value.startswith("wv"):
            assert value not in as_json, path
            assert value.encode("utf-8") not in as_struct, path
    for path in transformed:
        released = policy.released_value(
            peer, "records", "summary", direction, path, originals[path], claims
        )
        assert released is not None and released != originals[path]
    if not hidden:  # the gateway then reuses the input's digest for what it releases
        assert canonical_json(result.output) == canonical_json(payload)


@SETTINGS
@given(payload=payloads)
def test_a_filter_that_hides_nothing_releases_the_payload_unchanged(
    tmp_path: Path, payload: dict[str, Any]
) -> None:
    """The gateway digests a payload once when the policy withheld and transformed nothing."""
    policy = load(tmp_path, "p, insurer, records, summary, share, **, allow\n")
    result = policy.filter("insurer", "records", "summary", "share", payload, None)
    assert not result.withheld and not result.transformed
    assert canonical_json(result.output) == canonical_json(payload)


@SETTINGS
@given(
    text=rule_files,
    peer=st.sampled_from(PEERS),
    agent=st.sampled_from(AGENTS),
    skill=st.sampled_from(SKILLS),
    direction=st.sampled_from(["invoke", "send", "share"]),
    path=st.lists(st.sampled_from([*KEYS, "[]"]), min_size=1, max_size=5),
    asks=st.sampled_from(["fields", "fields", "keys", "provenance"]),
    claims=claims,
)
def test_compiled_decisions_equal_casbins(
    tmp_path: Path,
    text: str,
    peer: str,
    agent: str,
    skill: str,
    direction: str,
    path: list[str],
    asks: str,
    claims: Any,
) -> None:
    """For fields, for a map's keys (`keys(...)`) and for `@provenance`, under claims that may be
    absent, empty or multi-valued."""
    policy = load(tmp_path, text)
    if path[0] == "[]":
        path[0] = "a"
    normalized = paths.render(tuple(None if s == "[]" else s for s in path))
    if asks == "provenance":
        direction = "share"
    if direction == "invoke":
        normalized = ""
    elif asks == "keys":
        normalized = f"keys({normalized})"
    elif asks == "provenance":
        normalized = "@provenance"
    for _ in range(2):  # the second answer comes from the memo
        compiled = policy.rule_for(peer, agent, skill, direction, normalized, claims)
        assert compiled == policy.casbin_rule_for(peer, agent, skill, direction, normalized, claims)
    if asks == "provenance":
        decision = policy.may_share_provenance(peer, agent, skill, claims)
        by_casbin = policy.casbin_rule_for(peer, agent, skill, "share", "@provenance", claims)
        assert decision.rule == (by_casbin.describe() if by_casbin else None)
        assert decision.allowed == (by_casbin is not None and by_casbin.values[5] == "allow")


@SETTINGS
@given(
    value=st.one_of(
        st.text(max_size=30),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.dates().map(str),
        st.datetimes().map(lambda d: d.isoformat()),
    ),
    effect=st.sampled_from([*EFFECTS[2:], "mask:0", "generalize:1", "generalize:1000"]),
)
def test_a_transformed_value_never_equals_the_original(value: Any, effect: str) -> None:
    released = transforms.apply(transforms.parse_effect(effect), value, KEY, "insurer")
    assert released is None or released != value


@SETTINGS
@given(
    value=st.one_of(st.text(max_size=30), st.integers()),
    peers=st.lists(
        st.sampled_from(["insurer", "clinic", "pharmacy", "lab"]),
        min_size=2,
        max_size=2,
        unique=True,
    ),
)
def test_pseudonyms_are_stable_per_peer_and_differ_across_peers(
    value: Any, peers: list[str]
) -> None:
    first, second = (transforms.pseudonymize(value, KEY, peer) for peer in peers)
    assert first == transforms.pseudonymize(value, KEY, peers[0])
    assert first != second


def test_pseudonyms_through_filter(tmp_path: Path) -> None:
    policy = load(tmp_path, "p, *, records, summary, share, id, pseudonymize\n")
    one = policy.filter("insurer", "records", "summary", "share", {"id": "INS-1"}).output
    again = policy.filter("insurer", "records", "summary", "share", {"id": "INS-1"}).output
    other = policy.filter("clinic", "records", "summary", "share", {"id": "INS-1"}).output
    assert one == again != other
