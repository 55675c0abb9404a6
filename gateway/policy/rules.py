"""The rules file of the sharing policy: parsing, validation and the Casbin model it compiles.

Rules are Casbin `p` lines (see policies/README.md):

    p, PEER, AGENT, SKILL, DIRECTION, FIELD, EFFECT[, CONDITION]

FIELD is a field pattern (gateway.policy.paths), `keys(PATTERN)` (the keys of the maps PATTERN
matches) or `@provenance` (whether receipts of sub-tasks leave; share rules only). CONDITION tests
the requester's delegated claims and fails closed (Condition). `check_policy` parses a file into
Rules in precedence order with every problem found; `_build_enforcer` hands them to Casbin, whose
matcher functions (nameMatch, fieldMatch, claimsMatch) are defined here. The compiled decisions
live in gateway.policy.engine.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import casbin
from casbin.util import escape_assertion

from gateway.config import AGENT_NAME, ORG_NAME
from gateway.errors import PolicyError
from gateway.policy import analysis, paths, transforms

Direction = Literal["invoke", "send", "share"]
DIRECTIONS: tuple[str, ...] = ("invoke", "send", "share")
Claims = Mapping[str, str | Sequence[str]] | None

# The Casbin model Fedgate compiles. model.conf must say exactly this (comments aside).
MODEL_REQUEST = ("peer", "agent", "skill", "dir", "field", "claims")
MODEL_POLICY = ("peer", "agent", "skill", "dir", "field", "action", "cond")
MODEL_EFFECT = "priority(p.eft) || deny"
MODEL_MATCHER = (
    "nameMatch(r.peer, p.peer) && nameMatch(r.agent, p.agent) && nameMatch(r.skill, p.skill) "
    "&& r.dir == p.dir && fieldMatch(r.field, p.field) && claimsMatch(r.claims, p.cond)"
)


_CONDITION = re.compile(r"\s*([A-Za-z0-9_.:-]+)\s*(!?=)\s*([^&]*?)\s*")

# What a rule decides (Rule.target).
FIELDS = "fields"
KEYS = "keys"
PROVENANCE = "provenance"
_KEYS_OPEN = "keys("


@dataclass(frozen=True)
class Condition:
    """One clause of a rule's condition: claim NAME has (or, negated, lacks) VALUE.

    Fails closed: an absent or empty claim fails every clause on it, negated or not. A claim may
    hold several values: `x=v` holds iff v is among them; `x!=v` iff there is at least one value
    and v is none of them.
    """

    name: str
    value: str
    negated: bool = False

    def holds(self, claims: Mapping[str, frozenset[str]]) -> bool:
        values = claims.get(self.name)
        if not values:
            return False
        return self.value not in values if self.negated else self.value in values


@dataclass(frozen=True)
class Rule:
    """One `p` line of the rules file, parsed."""

    source: str  # "policies/hospital.csv:12"
    text: str  # the line as written
    values: tuple[str, ...]  # the seven Casbin columns, as Casbin sees them
    peer: str
    agent: str
    skill: str
    direction: str
    pattern: paths.Pattern
    effect: transforms.Effect
    conditions: tuple[Condition, ...]
    line: int = field(compare=False)
    description: str = field(default="", compare=False)  # "file:line: the line"
    # What the rule decides: FIELDS (payload fields, or invoke), KEYS (the keys of the maps its
    # pattern matches: `keys(P)`) or PROVENANCE (whether sub-task receipts leave).
    target: str = FIELDS

    @property
    def precedence(self) -> tuple[Any, ...]:
        return (paths.sort_key(self.pattern), self.effect.restrictiveness, self.line)

    def describe(self) -> str:
        return self.description

    @property
    def field_text(self) -> str:
        """The field column in canonical spelling (part of a pseudonym's scope)."""
        return _field_text(self.target, self.pattern)

    def applies(self, segments: paths.PathSegments, claims: Mapping[str, frozenset[str]]) -> bool:
        """Whether the rule decides a field (FIELDS: its pattern covers it) or a map's keys
        (KEYS: its pattern matches the map exactly) under these claims."""
        if self.target == KEYS:
            matched = paths.matches(self.pattern, segments)
        elif self.target == PROVENANCE:
            matched = True  # asked only of @provenance (the table keeps these rules apart)
        else:
            matched = paths.covers(self.pattern, segments)
        return matched and all(c.holds(claims) for c in self.conditions)


@dataclass(frozen=True)
class PolicyReport:
    """What `check_policy` found: errors make a policy unusable, warnings do not."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]


@functools.lru_cache(maxsize=4096)
def _field_text(target: str, pattern: paths.Pattern) -> str:
    if target == PROVENANCE:
        return paths.PROVENANCE
    rendered = paths.render_pattern(pattern)
    return f"keys({rendered})" if target == KEYS else rendered


def _label(path: Path) -> str:
    """A path as shown in messages: relative to the working folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def claim_sets(claims: Claims) -> dict[str, frozenset[str]]:
    """Delegated claims as sets of strings (a single value is a set of one). None and empty
    strings are no value, and a claim left without values is absent: it fails every condition."""
    if not claims:
        return {}
    result: dict[str, frozenset[str]] = {}
    for name, value in claims.items():
        if value is None:
            continue
        if isinstance(value, str):
            items = frozenset((value,))
        elif isinstance(value, Collection) and not isinstance(value, Mapping):
            items = frozenset(str(item) for item in value if item is not None)
        else:
            items = frozenset((str(value),))
        items = items - {""}
        if items:
            result[str(name)] = items
    return result


def parse_condition(text: str) -> tuple[Condition, ...]:
    """`purpose=treatment & role!=intern` as clauses; empty means always. Raises ValueError."""
    if not text.strip():
        return ()
    clauses = []
    for part in text.split("&"):
        match = _CONDITION.fullmatch(part)
        if match is None or not match.group(3):
            raise ValueError(
                f"malformed condition {text.strip()!r}: use claim=value or claim!=value, "
                "joined with '&' (e.g. purpose=treatment & role=doctor)"
            )
        clauses.append(Condition(match.group(1), match.group(3), match.group(2) == "!="))
    return tuple(clauses)


def split_line(line: str) -> list[str] | None:
    """Split a rules line into stripped tokens the way Casbin's file adapter does."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    tokens: list[str] = []
    depth = 0
    start = 0
    for index, char in enumerate(line):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced brackets")
        elif char == "," and depth == 0:
            tokens.append(line[start:index].strip())
            start = index + 1
    if depth != 0:
        raise ValueError("unbalanced brackets")
    tokens.append(line[start:].strip())
    return tokens


def _parse_rule(source: str, line: int, text: str, tokens: list[str]) -> Rule:
    """One `p` line as a Rule; raises ValueError with the cause and the fix."""
    if tokens[0] != "p":
        raise ValueError(f"unknown line type {tokens[0]!r}: every rule starts with 'p,'")
    columns = tokens[1:]
    if len(columns) == 6:
        columns.append("")
    if len(columns) != 7:
        raise ValueError(
            f"expected 6 or 7 fields after 'p' (peer, agent, skill, direction, field, effect"
            f"[, condition]), got {len(columns)}"
        )
    peer, agent, skill, direction, pattern_text, action, cond = columns
    if peer != "*" and not ORG_NAME.fullmatch(peer):
        raise ValueError(f"peer {peer!r} is not an organization name or '*'")
    for kind, name in (("agent", agent), ("skill", skill)):
        if name != "*" and not AGENT_NAME.fullmatch(name):
            raise ValueError(f"{kind} {name!r} is not a valid name or '*'")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r} (use invoke, send or share)")
    effect = transforms.parse_effect(action)
    target = FIELDS
    if direction == "invoke":
        if pattern_text not in ("", "*"):
            raise ValueError(
                f"an invoke rule names no field: use '*' or leave it empty, not {pattern_text!r}"
            )
        if effect.kind not in (transforms.ALLOW, transforms.DENY):
            raise ValueError(f"an invoke rule is allow or deny, not {action!r}")
        pattern: paths.Pattern = ()
    elif pattern_text == paths.PROVENANCE:
        if direction != "share":
            raise ValueError(
                f"{paths.PROVENANCE} is asked of share rules only (whether receipts of our "
                "sub-tasks go along with our result): use direction share"
            )
        if effect.kind not in (transforms.ALLOW, transforms.DENY):
            raise ValueError(f"an {paths.PROVENANCE} rule is allow or deny, not {action!r}")
        target, pattern = PROVENANCE, (paths.Segment(paths.RESERVED, paths.PROVENANCE),)
    elif pattern_text.startswith(_KEYS_OPEN) and pattern_text.endswith(")"):
        inner = pattern_text[len(_KEYS_OPEN) : -1].strip()
        try:
            pattern = paths.parse_pattern(inner)
        except paths.PathSyntaxError as exc:
            raise ValueError(f"bad field pattern {inner!r} in {pattern_text!r}: {exc}") from None
        if effect.kind not in (transforms.PSEUDONYMIZE, transforms.ALLOW):
            raise ValueError(
                f"a keys(...) rule is pseudonymize[:SCOPE] (the keys leave as pseudonyms) or "
                f"allow (they leave as they are), not {action!r}"
            )
        target = KEYS
    else:
        if not pattern_text:
            raise ValueError("a send or share rule names a field pattern (use ** for every field)")
        try:
            pattern = paths.parse_pattern(pattern_text)
        except paths.PathSyntaxError as exc:
            raise ValueError(f"bad field pattern {pattern_text!r}: {exc}") from None
    conditions = parse_condition(cond)
    return Rule(
        source=f"{source}:{line}",
        text=text.strip(),
        values=tuple(columns),
        peer=peer,
        agent=agent,
        skill=skill,
        direction=direction,
        pattern=pattern,
        effect=effect,
        conditions=conditions,
        line=line,
        description=f"{source}:{line}: {text.strip()}",
        target=target,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(
            f"{_label(path)}: {what} file not found: check [policy] {what} in fedgate.toml"
        ) from None
    except OSError as exc:
        raise PolicyError(f"{_label(path)}: cannot read the {what} file: {exc.strerror}") from None


def _name_match(request: str, rule: str) -> bool:
    return rule == "*" or request == rule


def _field_kind(text: str) -> tuple[str, str]:
    """What a field column or a request field names: (target, pattern or path)."""
    if text == paths.PROVENANCE:
        return PROVENANCE, ""
    if text.startswith(_KEYS_OPEN) and text.endswith(")"):
        return KEYS, text[len(_KEYS_OPEN) : -1].strip()
    return FIELDS, text


def _field_match(request: str, rule: str) -> bool:
    if request == "":
        return rule in ("", "*")  # an invoke request names no field
    if rule == "":
        return False
    request_kind, request_path = _field_kind(request)
    rule_kind, rule_pattern = _field_kind(rule)
    if request_kind != rule_kind:  # `*` and `**` never decide @provenance or keys(...)
        return False
    if request_kind == PROVENANCE:
        return True
    pattern, path = paths.parse_pattern(rule_pattern), paths.parse_normalized(request_path)
    return paths.matches(pattern, path) if request_kind == KEYS else paths.covers(pattern, path)


def _claims_match(claims: Claims, cond: str) -> bool:
    sets = claim_sets(claims)
    return all(c.holds(sets) for c in parse_condition(cond))


def _build_enforcer(model_path: Path, rules: Sequence[Rule]) -> casbin.Enforcer:
    label = _label(model_path)
    try:
        enforcer = casbin.Enforcer(str(model_path))
        model = enforcer.get_model()
        request = tuple(t.removeprefix("r_") for t in model["r"]["r"].tokens)
        policy = tuple(t.removeprefix("p_") for t in model["p"]["p"].tokens)
        effect = model["e"]["e"].value
        matcher = model["m"]["m"].value
    except Exception as exc:  # Casbin raises whatever its parser meets
        raise PolicyError(
            f"{label}: not a valid Casbin model ({type(exc).__name__}: {exc}): "
            "restore policies/model.conf from the Fedgate release"
        ) from None
    expected = (
        ("request_definition r", request, MODEL_REQUEST),
        ("policy_definition p", policy, MODEL_POLICY),
        ("policy_effect e", " ".join(effect.split()), escape_assertion(MODEL_EFFECT)),
        ("matchers m", " ".join(matcher.split()), escape_assertion(MODEL_MATCHER)),
    )
    for name, found, wanted in expected:
        if found != wanted:
            shown = ", ".join(wanted) if isinstance(wanted, tuple) else wanted
            raise PolicyError(
                f"{label}: {name} differs from the model Fedgate compiles: set it to {shown!r}"
            )
    enforcer.add_function("nameMatch", _name_match)
    enforcer.add_function("fieldMatch", _field_match)
    enforcer.add_function("claimsMatch", _claims_match)
    enforcer.add_policies([list(rule.values) for rule in rules])
    return enforcer


def check_policy(
    model_path: Path | str,
    rules_path: Path | str,
    *,
    known_agents: Mapping[str, Collection[str]] | None = None,
    known_peers: Collection[str] | None = None,
    shadowing: bool = True,
) -> tuple[PolicyReport, tuple[Rule, ...], bytes]:
    """Parse and validate the rules; returns every problem found, the rules in precedence order
    and the version input (model + rules bytes). Raises PolicyError only for unreadable files.
    `shadowing` adds warnings about rules that can never decide or that a broader rule
    overrides (gateway.policy.analysis); loading a policy skips that analysis."""
    model_path, rules_path = Path(model_path), Path(rules_path)
    model_bytes = _read(model_path, "model")
    rules_bytes = _read(rules_path, "rules")
    label = _label(rules_path)
    errors: list[str] = []
    warnings: list[tuple[int, str]] = []
    try:
        text = rules_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{label}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    rules: list[Rule] = []
    seen: dict[tuple[str, ...], int] = {}
    repeated: dict[str, list[Rule]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            tokens = split_line(line)
            if tokens is None:
                continue
            rule = _parse_rule(label, number, line, tokens)
        except ValueError as exc:
            errors.append(f"{label}:{number}: {exc}")
            continue
        if rule.values in seen:
            warnings.append(
                (
                    number,
                    f"{label}:{number}: duplicates line {seen[rule.values]}; this line is ignored",
                )
            )
            continue
        seen[rule.values] = number
        rules.append(rule)
        for warning in _rule_warnings(rule, known_agents, known_peers):
            repeated.setdefault(warning, []).append(rule)
    # One warning per distinct problem, at its first line, rather than one per rule.
    for warning, found in repeated.items():
        more = f" (and {len(found) - 1} more rules)" if len(found) > 1 else ""
        warnings.append((found[0].line, f"{found[0].source}: {warning}{more}"))
    if not rules and not errors:
        warnings.append(
            (0, f"{label}: no rules: nothing is invoked, sent or shared (default deny)")
        )
    ordered = tuple(sorted(rules, key=lambda r: r.precedence))
    if shadowing and not errors:
        warnings += analysis.shadowing_warnings(ordered)
    return (
        PolicyReport(tuple(errors), tuple(text for _, text in sorted(warnings))),
        ordered,
        model_bytes + b"\x00" + rules_bytes,
    )


def _rule_warnings(
    rule: Rule,
    known_agents: Mapping[str, Collection[str]] | None,
    known_peers: Collection[str] | None,
) -> list[str]:
    found = []
    if known_peers is not None and rule.peer != "*" and rule.peer not in known_peers:
        found.append(f"rule names peer {rule.peer!r} which is not a peer of this gateway")
    # A send rule names the remote target's agent and skill, which we cannot know here.
    if known_agents is not None and rule.direction != "send" and rule.agent != "*":
        if rule.agent not in known_agents:
            found.append(f"rule names agent {rule.agent!r} which this gateway does not have")
        elif rule.skill != "*" and rule.skill not in known_agents[rule.agent]:
            found.append(
                f"rule names skill '{rule.agent}.{rule.skill}' which this gateway does not have"
            )
    return found
