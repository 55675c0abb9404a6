"""The field-level sharing policy: Casbin rules compiled into fast, immutable decisions.

Contract
--------
Three questions, per peer organization, each default deny:
  invoke  may the peer call our agent.skill?                       -> Policy.may_invoke
  send    may this field of our outbound request go to the peer?   -> Policy.filter(..., "send")
  share   may this field of our result go to the peer that asked?  -> Policy.filter(..., "share")
and, for multi-hop results:
  may anything about our sub-tasks (their receipts) go along?      -> Policy.may_share_provenance
A field that no rule covers does not leave. Withheld fields are removed from the output, and a
container left empty by withholding is removed too. What leaves about the fields besides values,
the withheld and transformed paths, names only keys a rule names or the output shows (`_Walk.
reported`); a `keys(...)` rule lets the keys of a map leave as pseudonyms.

Rules are Casbin `p` lines, parsed by gateway.policy.rules (see policies/README.md):

    p, PEER, AGENT, SKILL, DIRECTION, FIELD, EFFECT[, CONDITION]

Which rule decides (the same order for every question):
  1. only rules whose peer, agent, skill (each may be `*`), direction and condition match apply,
     and whose field pattern covers the field (matches it or one of its ancestors);
  2. the most specific pattern wins (gateway.policy.paths: segment by segment, a literal key or
     `[]` beats `*` beats `**`, and a deeper pattern beats its own prefix);
  3. at equal specificity the most restrictive effect wins: deny, pseudonymize, mask (fewer
     characters kept first), generalize (year, then wider ranges first), allow;
  4. then the earlier line of the file.
Peer, agent, skill and condition select rules but do not make one more specific than another.

Casbin is the source of truth: the rules are handed to a `casbin.Enforcer` in that order, and the
model's effect `priority(p.eft) || deny` lets the first matching rule decide (`enforce_ex` names
it). Walking every rule per field is far too slow, so the Policy compiles an index per
(peer, agent, skill, direction) and memoizes the deciding rule per (normalized path, claims that
conditions read). Tests check that the compiled answer always equals Casbin's.

A Policy is an immutable snapshot (its memo only caches pure results) and is safe to share across
threads and asyncio tasks. PolicyHolder swaps snapshots in one assignment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import casbin

from gateway.errors import InvalidArgument, PayloadLimitExceeded, PolicyError
from gateway.payload import DEFAULT_MAX_DEPTH, DEFAULT_MAX_FIELDS, check_limits
from gateway.policy import paths as paths
from gateway.policy import transforms
from gateway.policy.keys import load_or_create_pseudonym_key
from gateway.policy.rules import (
    _KEYS_OPEN,
    DIRECTIONS,
    FIELDS,
    KEYS,
    MODEL_EFFECT,
    MODEL_MATCHER,
    MODEL_POLICY,
    MODEL_REQUEST,
    PROVENANCE,
    Claims,
    Condition,
    Direction,
    PolicyReport,
    Rule,
    _build_enforcer,
    check_policy,
    claim_sets,
    parse_condition,
    split_line,
)

# Names of gateway.policy.rules and .keys stay importable from here, where callers found them.
__all__ = [
    "DIRECTIONS",
    "MODEL_EFFECT",
    "MODEL_MATCHER",
    "MODEL_POLICY",
    "MODEL_REQUEST",
    "Claims",
    "Condition",
    "Decision",
    "Direction",
    "FieldDecision",
    "FilterResult",
    "InvokeDecision",
    "Policy",
    "PolicyHolder",
    "PolicyReport",
    "Rule",
    "_build_enforcer",
    "check_policy",
    "claim_sets",
    "load_or_create_pseudonym_key",
    "load_policy",
    "parse_condition",
    "pseudonym_scope",
    "split_line",
]

log = logging.getLogger("fedgate.policy")

# Memo bounds: paths and claims come from payloads and tokens, so the caches must not grow forever.
_MAX_TABLES = 4096
_MAX_CLAIM_VARIANTS = 256
_MAX_PATHS = 65_536
_MAX_NAMED = 4096  # per table: how paths are reported (only withheld or transformed ones)


@dataclass(frozen=True)
class FieldDecision:
    path: str
    action: str
    rule: str | None


@dataclass(frozen=True)
class FilterResult:
    output: dict[str, Any]
    withheld: tuple[str, ...]
    transformed: tuple[tuple[str, str], ...]
    decisions: tuple[FieldDecision, ...]
    policy_version: str


@dataclass(frozen=True)
class Decision:
    """A yes/no answer of the policy (invoke, provenance), the rule that gave it, the version."""

    allowed: bool
    rule: str | None
    policy_version: str


InvokeDecision = Decision  # the name before may_share_provenance shared the type


def _purpose_of(claims: Claims) -> str:
    """The requester's purpose values as one canonical text (part of a pseudonym's scope)."""
    if not claims or not claims.get("purpose"):
        return "[]"
    values = claim_sets({"purpose": claims["purpose"]}).get("purpose", frozenset())
    return json.dumps(sorted(values), ensure_ascii=False)


def pseudonym_scope(
    rule: Rule, direction: str, agent: str, skill: str, purpose: str
) -> tuple[str, ...]:
    """What a pseudonym is scoped to beside the peer: the purpose, and the rule's field within
    this direction, agent and skill, or the author's scope name (`pseudonymize:NAME`)."""
    if rule.effect.scope:
        return ("scope", rule.effect.scope, purpose)
    return ("field", direction, agent, skill, rule.field_text, purpose)


class _Memo:
    """Decisions remembered for one table and one set of relevant claims."""

    __slots__ = ("decisions", "rules")

    def __init__(self) -> None:
        # normalized path, `keys(normalized map path)` or `@provenance` -> deciding rule
        self.rules: dict[str, Rule | None] = {}
        self.decisions: dict[str, FieldDecision] = {}  # concrete path -> its usual decision


class _Table:
    """The rules that can apply to one (peer, agent, skill, direction), and their memos."""

    __slots__ = (
        "contexts",
        "field_rules",
        "key_rules",
        "memos",
        "named",
        "plans",
        "provenance_rules",
        "rules",
        "vocabulary",
    )

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.field_rules = tuple(r for r in rules if r.target == FIELDS)
        self.key_rules = tuple(r for r in rules if r.target == KEYS)
        self.provenance_rules = tuple(r for r in rules if r.target == PROVENANCE)
        # The patterns whose literal keys a reported path may name.
        self.vocabulary = tuple(r.pattern for r in rules if r.target != PROVENANCE)
        self.memos: dict[tuple[Any, ...], _Memo] = {}
        # normalized path -> (keys a rule names, whether it names every key)
        self.named: dict[str, tuple[tuple[bool, ...], bool]] = {}
        self.plans: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        # (id(rule), purpose) -> pseudonym context; the table holds its rules, so ids stay valid
        self.contexts: dict[tuple[int, str], bytes] = {}

    def memo(self, claims_key: tuple[Any, ...]) -> _Memo:
        memo = self.memos.get(claims_key)
        if memo is None:
            if len(self.memos) >= _MAX_CLAIM_VARIANTS:
                self.memos.clear()
            memo = self.memos[claims_key] = _Memo()
        return memo

    def decide(self, path: str, claims: Mapping[str, frozenset[str]]) -> Rule | None:
        """The deciding rule for a normalized path, `keys(map path)` or `@provenance`."""
        segments: paths.PathSegments = ()
        if path == paths.PROVENANCE:
            rules = self.provenance_rules
        elif path.startswith(_KEYS_OPEN):
            rules = self.key_rules
            segments = paths.parse_normalized(path[len(_KEYS_OPEN) : -1])
        else:
            rules = self.field_rules
            segments = paths.parse_normalized(path) if path else ()
        for rule in rules:
            if rule.applies(segments, claims):
                return rule
        return None

    def names(self, normalized: str) -> tuple[bool, ...]:
        """For each segment of a normalized path, whether a rule of this table names it."""
        return self._naming(normalized)[0]

    def _naming(self, normalized: str) -> tuple[tuple[bool, ...], bool]:
        found = self.named.get(normalized)
        if found is None:
            segments = paths.parse_normalized(normalized)
            named = paths.named_keys(self.vocabulary, segments)
            every = all(flag or s is paths.ARRAY for flag, s in zip(named, segments, strict=True))
            found = (named, every)
            if len(self.named) >= _MAX_NAMED:
                self.named.clear()
            self.named[normalized] = found  # one entry: a concurrent clear cannot split it
        return found

    def plan(self, concrete: str, normalized: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """For a concrete path: the indices of its keys no rule names, and its prefixes."""
        found = self.plans.get(concrete)
        if found is None:
            named = self.names(normalized)
            segments = paths.concrete_prefixes(concrete)
            unnamed = tuple(
                index
                for index, (segment, _) in enumerate(segments)
                if not named[index] and not isinstance(segment, int)
            )
            found = (unnamed, tuple(prefix for _, prefix in segments))
            if len(self.plans) >= _MAX_NAMED:
                self.plans.clear()
            self.plans[concrete] = found
        return found

    def names_all(self, normalized: str) -> bool:
        """Whether a rule names every key of a normalized path (then it may leave as is)."""
        return self._naming(normalized)[1]


_MISSING: Any = object()
_WITHHELD: Any = object()
_LEAF_TYPES = frozenset({str, int, float, bool, type(None)})
_KEYS_ACTION = "keys"  # internal: a map whose keys left as pseudonyms


class Policy:
    """An immutable compiled policy snapshot; safe to share across asyncio tasks and threads."""

    def __init__(
        self,
        rules: tuple[Rule, ...],
        *,
        version: str,
        warnings: tuple[str, ...],
        pseudonym_key: bytes,
        enforcer: casbin.Enforcer,
    ) -> None:
        self.version = version
        self.warnings = warnings
        self.rules = rules
        self._key = pseudonym_key
        self._enforcer = enforcer
        self._enforcer_lock = threading.Lock()
        self._by_values = {rule.values: rule for rule in rules}
        self._groups: dict[tuple[str, str, str, str], list[Rule]] = {}
        for rule in rules:  # already in precedence order
            self._groups.setdefault((rule.direction, rule.peer, rule.agent, rule.skill), []).append(
                rule
            )
        self._claim_names = frozenset(c.name for r in rules for c in r.conditions)
        self._tables: dict[tuple[str, str, str, str], _Table] = {}

    # -- compiled decisions ---------------------------------------------------------------------

    def _table(self, peer: str, agent: str, skill: str, direction: str) -> _Table:
        key = (peer, agent, skill, direction)
        table = self._tables.get(key)
        if table is None:
            candidates: list[Rule] = []
            for group_peer in {peer, "*"}:
                for group_agent in {agent, "*"}:
                    for group_skill in {skill, "*"}:
                        candidates += self._groups.get(
                            (direction, group_peer, group_agent, group_skill), ()
                        )
            if len(self._tables) >= _MAX_TABLES:
                self._tables.clear()
            table = self._tables[key] = _Table(
                tuple(sorted(candidates, key=lambda r: r.precedence))
            )
        return table

    def _claims(self, claims: Claims) -> tuple[tuple[Any, ...], dict[str, frozenset[str]]]:
        if not claims or not self._claim_names:
            return (), {}
        sets = {n: v for n, v in claim_sets(claims).items() if n in self._claim_names}
        return tuple(sorted((n, tuple(sorted(v))) for n, v in sets.items())), sets

    def rule_for(
        self, peer: str, agent: str, skill: str, direction: str, path: str, claims: Claims = None
    ) -> Rule | None:
        """The rule the compiled index says decides a normalized path ('' for invoke,
        `keys(map path)` for a map's keys, `@provenance` for sub-task receipts)."""
        claims_key, sets = self._claims(claims)
        table = self._table(peer, agent, skill, direction)
        memo = table.memo(claims_key).rules
        rule = memo.get(path, _MISSING)
        if rule is _MISSING:
            rule = table.decide(path, sets)
            if len(memo) >= _MAX_PATHS:
                memo.clear()
            memo[path] = rule
        return rule  # type: ignore[no-any-return]

    def casbin_rule_for(
        self, peer: str, agent: str, skill: str, direction: str, path: str, claims: Claims = None
    ) -> Rule | None:
        """The rule Casbin's own enforce_ex names for the same request (slow: walks every rule)."""
        with self._enforcer_lock:
            matched, explain = self._enforcer.enforce_ex(
                peer, agent, skill, direction, path, dict(claims or {})
            )
        if not matched:
            return None
        return self._by_values[tuple(explain)]

    def explain_field(
        self, peer: str, agent: str, skill: str, direction: str, path: str, claims: Claims = None
    ) -> str | None:
        """Casbin's account of which rule decides a field (concrete or normalized path,
        `keys(...)` or `@provenance`)."""
        special = path == paths.PROVENANCE or path.startswith(_KEYS_OPEN)
        normalized = path if special or not path else paths.normalize(path)
        rule = self.casbin_rule_for(peer, agent, skill, direction, normalized, claims)
        return rule.describe() if rule else None

    def released_value(
        self,
        peer: str,
        agent: str,
        skill: str,
        direction: str,
        path: str,
        value: Any,
        claims: Claims = None,
    ) -> Any | None:
        """What leaves for one leaf value at a concrete path (None: withheld); for previews."""
        rule = self.rule_for(peer, agent, skill, direction, paths.normalize(path), claims)
        if rule is None or rule.effect.kind == transforms.DENY:
            return None
        if rule.effect.kind == transforms.ALLOW:
            return value
        if isinstance(value, dict | list):
            return None
        scope = pseudonym_scope(rule, direction, agent, skill, _purpose_of(claims))
        return transforms.apply(rule.effect, value, self._key, peer, scope)

    # -- the public questions -------------------------------------------------------------------

    def may_invoke(self, peer: str, agent: str, skill: str, claims: Claims = None) -> Decision:
        """May `peer` call our agent.skill? Default deny."""
        rule = self.rule_for(peer, agent, skill, "invoke", "", claims)
        allowed = rule is not None and rule.effect.kind == transforms.ALLOW
        return Decision(allowed, rule.describe() if rule else None, self.version)

    def may_share_provenance(
        self, peer: str, agent: str, skill: str, claims: Claims = None
    ) -> Decision:
        """May anything about the sub-tasks our agent.skill ran while serving `peer` (their
        receipts: which organizations were consulted, what they released) go to `peer` with
        our result? Decided by a share rule on `@provenance`; default deny."""
        rule = self.rule_for(peer, agent, skill, "share", paths.PROVENANCE, claims)
        allowed = rule is not None and rule.effect.kind == transforms.ALLOW
        return Decision(allowed, rule.describe() if rule else None, self.version)

    def filter(
        self,
        peer: str,
        agent: str,
        skill: str,
        direction: Literal["send", "share"],
        payload: dict[str, Any],
        claims: Claims = None,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_fields: int = DEFAULT_MAX_FIELDS,
    ) -> FilterResult:
        """What of `payload` may leave to `peer`; raises PayloadLimitExceeded or InvalidArgument
        for a payload that cannot be evaluated (it is then refused, never passed through).

        `withheld` and `transformed` hold reported paths (paths.parse_reported): they name only
        keys a rule names or the output shows; `decisions` hold concrete paths and are for local
        previews only (a key there can be data: never send or log them)."""
        if direction not in ("send", "share"):
            raise InvalidArgument(f"cannot filter for direction {direction!r}: use send or share")
        if not isinstance(payload, dict):
            raise InvalidArgument("a payload is a JSON object: wrap the value in an object")
        check_limits(payload, max_depth=max_depth, max_fields=max_fields)
        claims_key, sets = self._claims(claims)
        table = self._table(peer, agent, skill, direction)
        walk = _Walk(table, table.memo(claims_key), sets, self._key, peer)
        walk.context = (direction, agent, skill, claims)
        try:
            output = walk.object(payload, "", "")
        except RecursionError:
            raise PayloadLimitExceeded(
                "payload is nested too deep for this gateway to evaluate: lower "
                "[limits] max_payload_depth or flatten the payload"
            ) from None
        withheld, transformed = walk.reported()
        return FilterResult(output, withheld, transformed, tuple(walk.decisions), self.version)


class _Walk:
    """One filter pass over a payload, in payload order.

    Recursive on purpose (fast, order-preserving); check_limits has bounded the depth first, and
    a depth beyond Python's recursion limit is refused, never passed through.

    Paths are collected concrete and turned into reported paths at the end (`reported`), when it
    is known which containers the output shows.
    """

    __slots__ = (
        "context",
        "decisions",
        "key",
        "keyed",
        "memo",
        "named",
        "peer",
        "purpose",
        "renamed",
        "sets",
        "table",
        "transformed",
        "visible",
        "withheld",
    )

    def __init__(
        self, table: _Table, memo: _Memo, sets: dict[str, frozenset[str]], key: bytes, peer: str
    ) -> None:
        self.table = table
        self.memo = memo
        self.sets = sets
        self.key = key
        self.peer = peer
        self.context: tuple[str, str, str, Claims] = ("share", "", "", None)
        self.purpose: str | None = None  # the requester's purpose, once a pseudonym needs it
        self.named = table.named  # how the table reports paths (see _Table.names)
        # A path every key of which a rule names is kept as it leaves (a str); any other path
        # waits for the end of the walk as (concrete, normalized[, action]).
        self.withheld: list[str | tuple[str, str]] = []
        self.transformed: list[tuple[str, str] | tuple[str, str, str]] = []
        self.keyed = 0  # how many maps whose keys leave as pseudonyms enclose this point
        self.decisions: list[FieldDecision] = []
        self.visible: set[str] = set()  # concrete paths of containers the output shows
        self.renamed: dict[str, str] = {}  # concrete path of a map entry -> its key's pseudonym

    def scope(self, rule: Rule) -> bytes:
        """The pseudonym context of a rule in this pass (peer, purpose, field or scope name)."""
        direction, agent, skill, claims = self.context
        purpose = self.purpose
        if purpose is None:
            purpose = self.purpose = _purpose_of(claims)
        cached = self.table.contexts
        context = cached.get((id(rule), purpose))
        if context is None:
            scope = pseudonym_scope(rule, direction, agent, skill, purpose)
            if rule.target == KEYS:
                scope = ("keys", *scope)
            context = transforms.pseudonym_context(self.peer, scope)
            if len(cached) >= _MAX_PATHS:
                cached.clear()
            cached[(id(rule), purpose)] = context
        return context

    def key_rule(self, normalized: str) -> Rule | None:
        """The rule that decides how the keys of the map at a normalized path leave."""
        request = _KEYS_OPEN + normalized + ")"
        memo = self.memo.rules
        rule = memo.get(request, _MISSING)
        if rule is _MISSING:
            rule = self.table.decide(request, self.sets)
            if len(memo) >= _MAX_PATHS:
                memo.clear()
            memo[request] = rule
        return rule  # type: ignore[no-any-return]

    def object(self, value: dict[str, Any], concrete: str, normalized: str) -> dict[str, Any]:
        output: dict[str, Any] = {}
        suffixes = _NEXT_SUFFIX if concrete else _FIRST_SUFFIX
        keyed: Rule | None = None
        if concrete and self.table.key_rules:
            keyed = self.key_rule(normalized)
            if keyed is not None and keyed.effect.kind != transforms.PSEUDONYMIZE:
                keyed = None
            if keyed is not None:
                self.keyed += 1
        for name, child in value.items():
            suffix = suffixes.get(name)
            if suffix is None:
                suffix = _suffix(name, first=not concrete)
            path = concrete + suffix
            if keyed is not None:
                name = transforms.pseudonymize_key(name, self.key, self.scope(keyed))
                self.renamed[path] = name
            child_type = type(child)
            if (child_type is dict or child_type is list) and child:
                released = (
                    self.object(child, path, normalized + suffix)
                    if child_type is dict
                    else self.array(child, path, normalized + suffix)
                )
                if released:  # a container left empty by withholding is removed
                    output[name] = released
                    self.visible.add(path)
            else:
                released = self.leaf(child, path, normalized + suffix)
                if released is not _WITHHELD:
                    output[name] = released
        if keyed is not None:
            self.keyed -= 1
            if output:
                self.transformed.append((concrete, normalized, _KEYS_ACTION))
        return output

    def array(self, value: list[Any], concrete: str, normalized: str) -> list[Any]:
        output: list[Any] = []
        normalized += "[]"
        for index, child in enumerate(value):
            child_type = type(child)
            if (child_type is dict or child_type is list) and child:
                path = f"{concrete}[{index}]"
                released = (
                    self.object(child, path, normalized)
                    if child_type is dict
                    else self.array(child, path, normalized)
                )
                if released:
                    output.append(released)
                    self.visible.add(path)
            else:
                released = self.leaf(child, f"{concrete}[{index}]", normalized)
                if released is not _WITHHELD:
                    output.append(released)
        return output

    def leaf(self, value: Any, concrete: str, normalized: str) -> Any:
        """Decide one leaf (a scalar or an empty container); returns what leaves or _WITHHELD."""
        value_type = type(value)
        if value_type not in _LEAF_TYPES or (value_type is float and not math.isfinite(value)):
            _check_leaf(value, concrete)
        memo = self.memo
        rule = memo.rules.get(normalized, _MISSING)
        if rule is _MISSING:
            rule = self.table.decide(normalized, self.sets)
            if len(memo.rules) >= _MAX_PATHS:
                memo.rules.clear()
            memo.rules[normalized] = rule
        if rule is None:
            released, action = _WITHHELD, "withheld"
        else:
            kind = rule.effect.kind
            if kind == transforms.ALLOW:
                released, action = _copy_leaf(value), "allowed"
            elif kind == transforms.DENY or value_type is dict or value_type is list:
                released, action = _WITHHELD, "withheld"
            else:
                released = (
                    transforms.pseudonymize(value, self.key, self.peer, context=self.scope(rule))
                    if kind == transforms.PSEUDONYMIZE
                    else transforms.apply(rule.effect, value, self.key, self.peer)
                )
                if released is None:
                    released, action = _WITHHELD, "withheld"
                else:
                    action = transforms.ACTION_OF[kind]
                    named = self.named.get(normalized)
                    if not self.keyed and named is not None and named[1]:
                        self.transformed.append((concrete, action))
                    else:
                        self.transformed.append((concrete, normalized, action))
        if released is _WITHHELD:
            named = self.named.get(normalized)
            if not self.keyed and named is not None and named[1]:
                self.withheld.append(concrete)
            else:
                self.withheld.append((concrete, normalized))
        decision = memo.decisions.get(concrete)
        if (
            decision is None
            or decision.action != action
            or decision.rule is not (rule.description if rule else None)
        ):
            decision = FieldDecision(concrete, action, rule.description if rule else None)
            if len(memo.decisions) >= _MAX_PATHS:
                memo.decisions.clear()
            memo.decisions[concrete] = decision
        self.decisions.append(decision)
        return released

    # -- what leaves about the paths ------------------------------------------------------------

    def reported(self) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        """The withheld and transformed paths as they may leave: a withheld path stops at its
        first key that no rule names and the output does not show, written `*` (paths that
        thereby coincide are reported once: `hiv.*` stands for all of them, uncounted); a key
        that left as a pseudonym is written as that pseudonym."""
        withheld: tuple[str, ...] = tuple(
            entry if type(entry) is str else self.report(*entry, released=False)
            for entry in self.withheld
        )
        if len(withheld) > 1 and any(type(entry) is not str for entry in self.withheld):
            withheld = tuple(dict.fromkeys(withheld))
        transformed: list[tuple[str, str]] = []
        for entry in self.transformed:
            if len(entry) == 2:
                transformed.append(entry)
                continue
            concrete, normalized, action = entry
            if action == _KEYS_ACTION:
                shown = self.report(concrete, normalized, released=True)
                transformed.append((shown + ".*", "pseudonymized"))
            else:
                transformed.append((self.report(concrete, normalized, released=True), action))
        return withheld, tuple(transformed)

    def report(self, concrete: str, normalized: str, *, released: bool) -> str:
        """One concrete path as it may leave (`released`: the field itself is in the output)."""
        if not self.renamed:
            unnamed, prefixes = self.table.plan(concrete, normalized)
            last = len(prefixes) - 1
            for index in unnamed:  # a key no rule names leaves only if the output shows it
                if not (released if index == last else prefixes[index] in self.visible):
                    return prefixes[index - 1] + ".*" if index else paths.HIDDEN_KEY
            return concrete
        named = self.table.names(normalized)
        segments = paths.concrete_prefixes(concrete)
        reported: list[str | int | None] = []
        last = len(segments) - 1
        for index, (segment, here) in enumerate(segments):
            if isinstance(segment, int):
                reported.append(segment)
                continue
            shown = released if index == last else here in self.visible
            pseudonym = self.renamed.get(here)
            if shown:
                reported.append(pseudonym if pseudonym is not None else segment)
            elif named[index] and pseudonym is None:
                reported.append(segment)
            else:  # nothing below a key that may not be named is told either
                reported.append(None)
                break
        return paths.render_concrete(reported)


# Rendered key suffixes, for the first segment of a path and for the following ones.
_FIRST_SUFFIX: dict[str, str] = {}
_NEXT_SUFFIX: dict[str, str] = {}


def _suffix(name: Any, *, first: bool) -> str:
    if type(name) is not str:
        raise InvalidArgument("a payload key is not a string: JSON object keys are strings")
    cache = _FIRST_SUFFIX if first else _NEXT_SUFFIX
    suffix = paths.render_key(name, first=first)
    if len(cache) >= _MAX_PATHS:
        cache.clear()
    cache[name] = suffix
    return suffix


def _check_leaf(value: Any, path: str) -> None:
    """Refuse what JSON cannot carry (subclasses of the JSON types are accepted)."""
    if isinstance(value, dict | list):
        return
    if not isinstance(value, str | int | float | bool) and value is not None:
        raise InvalidArgument(
            f"payload value at {path} is a {type(value).__name__}, which JSON cannot carry"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"payload value at {path} is not a finite number")


def _copy_leaf(value: Any) -> Any:
    """An allowed leaf as it leaves: scalars as is, an empty container as a fresh one."""
    if type(value) is dict:
        return {}
    if type(value) is list:
        return []
    return value


def load_policy(
    model_path: Path | str,
    rules_path: Path | str,
    *,
    pseudonym_key: bytes,
    known_agents: Mapping[str, Collection[str]] | None = None,
    known_peers: Collection[str] | None = None,
) -> Policy:
    """Load, validate and compile a policy; raises PolicyError naming the file and the line."""
    if len(pseudonym_key) < 16:
        raise PolicyError(
            "the pseudonym key is shorter than 16 bytes: use load_or_create_pseudonym_key"
        )
    report, rules, version_input = check_policy(
        model_path,
        rules_path,
        known_agents=known_agents,
        known_peers=known_peers,
        shadowing=False,
    )
    if report.errors:
        more = len(report.errors) - 1
        suffix = f" (and {more} more: run `fedgate policy check`)" if more else ""
        raise PolicyError(report.errors[0] + suffix)
    enforcer = _build_enforcer(Path(model_path), rules)
    return Policy(
        rules,
        version="sha256:" + hashlib.sha256(version_input).hexdigest(),
        warnings=report.warnings,
        pseudonym_key=pseudonym_key,
        enforcer=enforcer,
    )


def _fingerprint(paths_to_watch: Sequence[Path]) -> tuple[str, ...]:
    found = []
    for path in paths_to_watch:
        try:
            found.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError:
            found.append("missing")
    return tuple(found)


class PolicyHolder:
    """Holds the current Policy; reload builds the new one aside and swaps it in one assignment."""

    def __init__(self, load: Callable[[], Policy]) -> None:
        self._load = load
        self._reload_lock = threading.Lock()
        self._current = load()

    @property
    def current(self) -> Policy:
        return self._current

    def reload(self) -> Policy:
        """Load the policy again; on PolicyError keep serving the old one and re-raise."""
        with self._reload_lock:
            try:
                policy = self._load()
            except PolicyError as exc:
                log.warning(
                    "policy reload refused, still serving %s: %s",
                    self._current.version,
                    exc.message,
                )
                raise
            self._current = policy
        log.info("policy %s loaded (%d rules)", policy.version, len(policy.rules))
        return policy

    async def watch(self, paths: Sequence[Path], interval: float = 1.0) -> None:
        """Reload whenever one of `paths` changes; runs until cancelled."""
        seen = await asyncio.to_thread(_fingerprint, paths)
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(_fingerprint, paths)
            if now == seen:
                continue
            seen = now  # a refused version is reported once, not at every poll
            try:
                await asyncio.to_thread(self.reload)
            except PolicyError:
                pass  # reload() has logged it
            except Exception:
                log.exception("policy reload failed, still serving %s", self._current.version)
