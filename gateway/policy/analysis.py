"""Rules that can never decide, and rules that a broader rule overrides where an author would not
expect it: the warnings of `fedgate policy check`.

Rules are tried in precedence order (gateway.policy.engine), and the first that applies decides.
So a rule R never decides when an earlier rule S applies wherever R applies: S selects at least
the requests R selects (its peer, agent and skill are R's or `*`), S's condition asks nothing R's
does not, and every field R covers is covered by S. The classic case is `**.ssn, deny` after
`patient, allow`: `patient` is more specific (a literal first segment beats `**`), so the deny
does not decide `patient.ssn`. When R still decides elsewhere this is not dead, but where R is the
stricter rule and S lets the field out, it is warned about with an example path.

Patterns are small regular languages over keys and array elements; inclusion and overlap are
decided exactly on automata, over an alphabet of the literal keys both patterns name, one key
neither names, and the array element.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gateway.policy import paths, transforms

if TYPE_CHECKING:
    from gateway.policy.engine import Rule

_OTHER_KEY = "\x00any key"  # stands for every key that neither pattern names
_COVER = (paths.Segment(paths.ANY_DEPTH),)
_MAX_EXAMPLES = 64  # overriding rules compared to pick the shortest example paths
_SHOWN = 3
# One segment or more below a pattern: a key or an element, then anything.
_BELOW = (
    (paths.Segment(paths.ANY_KEY), paths.Segment(paths.ANY_DEPTH)),
    (paths.Segment(paths.ELEMENT), paths.Segment(paths.ANY_DEPTH)),
)


def _alphabet(*patterns: paths.Pattern) -> list[str | None]:
    keys = {s.key for p in patterns for s in p if s.kind == paths.LITERAL}
    return [*sorted(keys), _OTHER_KEY, paths.ARRAY]


def _accepts(pattern: paths.Pattern, states: set[int]) -> bool:
    return len(pattern) in paths._closure(pattern, states)


def _search(
    first: paths.Pattern, second: paths.Pattern, *, included: bool
) -> list[str | None] | None:
    """A path in L(first) and not in L(second) (included=True), or in both (included=False);
    None when there is none. Breadth first, so the example is a shortest one."""
    alphabet = _alphabet(first, second)
    start = (frozenset({0}), frozenset({0}))
    seen = {start}
    queue: deque[tuple[frozenset[int], frozenset[int], list[str | None]]] = deque([(*start, [])])
    while queue:
        states_a, states_b, path = queue.popleft()
        for symbol in alphabet:
            if not path and symbol is paths.ARRAY:
                continue  # a payload is an object: a path starts with a key
            next_a = paths._step(first, set(states_a), symbol)
            if not next_a:
                continue
            next_b = paths._step(second, set(states_b), symbol)
            if _accepts(first, next_a) and (
                _accepts(second, next_b) is not included if included else _accepts(second, next_b)
            ):
                return [*path, symbol]
            key = (frozenset(next_a), frozenset(next_b))
            if key not in seen:
                seen.add(key)
                queue.append((key[0], key[1], [*path, symbol]))
    return None


def _render(path: Sequence[str | None]) -> str:
    return paths.render_pattern(
        tuple(
            paths.Segment(paths.ELEMENT)
            if item is paths.ARRAY
            else paths.Segment(paths.ANY_KEY)
            if item == _OTHER_KEY
            else paths.Segment(paths.LITERAL, item)
            for item in path
        )
    )


def _domain(rule: Rule) -> paths.Pattern:
    """The fields a rule decides when it applies: what its pattern covers (keys rules: matches)."""
    if rule.target == "fields":
        return rule.pattern + _COVER
    return rule.pattern


def _never_alone(rule: Rule, earlier: Rule) -> bool:
    """Whether `earlier` applies to every request and field `rule` applies to."""
    if rule.target == "provenance" or rule.direction == "invoke":
        return True
    if _first_key(earlier) is not None and _first_key(rule) != _first_key(earlier):
        return False  # the earlier rule names one first key, this one others as well
    return _search(_domain(rule), _domain(earlier), included=True) is None


def _short(rule: Rule) -> str:
    field = f"{rule.values[4]}, " if rule.direction != "invoke" else ""
    condition = f", {rule.values[6]}" if rule.values[6] else ""
    return f"{field}{rule.values[5]}{condition}"


def _leaves(effect: transforms.Effect) -> str:
    return {
        transforms.ALLOW: "allowed",
        transforms.DENY: "withheld",
        transforms.MASK: "masked",
        transforms.PSEUDONYMIZE: "pseudonymized",
    }.get(effect.kind, "generalized")


def _selects_all_of(broad: str, narrow: str) -> bool:
    return broad == "*" or broad == narrow


def _contradiction(rule: Rule) -> str | None:
    for clause in rule.conditions:
        for other in rule.conditions:
            same = clause.name == other.name and clause.value == other.value
            if same and clause.negated and not other.negated:
                return f"{clause.name}={clause.value} and {clause.name}!={clause.value}"
    return None


def shadowing_warnings(rules: Sequence[Rule]) -> list[tuple[int, str]]:
    """(line, warning) for each rule that can never decide, or that a broader, less restrictive
    rule overrides on part of what it names. `rules` are in precedence order."""
    warnings: list[tuple[int, str]] = []
    # (direction, target) -> (peer, agent, skill) -> literal first key or None -> rule indices
    groups: dict[tuple[str, str], dict[tuple[str, str, str], dict[str | None, list[int]]]] = {}
    for index, rule in enumerate(rules):
        groups.setdefault((rule.direction, rule.target), {}).setdefault(
            (rule.peer, rule.agent, rule.skill), {}
        ).setdefault(_first_key(rule), []).append(index)
    for index, rule in enumerate(rules):
        contradiction = _contradiction(rule)
        if contradiction is not None:
            warnings.append(
                (
                    rule.line,
                    f"{rule.source}: rule never decides: its condition asks {contradiction}",
                )
            )
            continue
        found = _check(rule, index, rules, groups[(rule.direction, rule.target)])
        if found is not None:
            warnings.append((rule.line, found))
    return warnings


Group = dict[tuple[str, str, str], dict[str | None, list[int]]]


def _candidates(rule: Rule, index: int, group: Group, *, overlap: bool) -> Iterable[int]:
    """Indices of earlier rules whose selectors cover (or, with overlap, meet) the rule's and
    whose first key can meet the rule's, in precedence order."""
    selectors = (rule.peer, rule.agent, rule.skill)
    if not overlap or "*" not in selectors:  # then meeting it means: its value or `*`
        keys: Iterable[tuple[str, str, str]] = {
            (p, a, s)
            for p in {rule.peer, "*"}
            for a in {rule.agent, "*"}
            for s in {rule.skill, "*"}
        }
    else:
        keys = [
            key
            for key in group
            if all(x == "*" or y == "*" or x == y for x, y in zip(key, selectors, strict=True))
        ]
    first = _first_key(rule)
    found: list[int] = []
    for key in keys:
        by_first = group.get(key)
        if by_first is None:
            continue
        lists = (
            by_first.values()
            if first is None
            else (by_first.get(first, ()), by_first.get(None, ()))
        )
        for indices in lists:
            for earlier in indices:
                if earlier >= index:
                    break
                found.append(earlier)
    return sorted(found)


def _first_key(rule: Rule) -> str | None:
    """The literal first key of a rule's pattern, None when it starts with a wildcard."""
    if rule.pattern and rule.pattern[0].kind == paths.LITERAL:
        return rule.pattern[0].key
    return None


def _first_keys_meet(rule: Rule, earlier: Rule) -> bool:
    a, b = _first_key(rule), _first_key(earlier)
    return a is None or b is None or a == b


def _decider(
    rule: Rule,
    rules: Sequence[Rule],
    candidates: Sequence[int],
    earlier: Rule,
    example: list[str | None],
) -> int | None:
    """The rule that decides an example path for a request both rules select, when it is less
    strict than `rule`; None when a rule at least as strict decides it first. `candidates` are
    the earlier rules whose selectors meet the rule's, in precedence order. Rules that ask a
    condition `rule` does not are left out: they decide only sometimes."""
    request = [
        x if x != "*" else y if y != "*" else "\x00any"
        for x, y in zip(
            (rule.peer, rule.agent, rule.skill),
            (earlier.peer, earlier.agent, earlier.skill),
            strict=True,
        )
    ]
    path = tuple(None if item is paths.ARRAY else item for item in example)
    conditions = set(rule.conditions)
    for candidate_index in candidates:
        candidate = rules[candidate_index]
        selectors = (candidate.peer, candidate.agent, candidate.skill)
        if not all(s == "*" or s == r for s, r in zip(selectors, request, strict=True)):
            continue
        if not set(candidate.conditions) <= conditions:
            continue
        if paths.covers(candidate.pattern, path):
            stricter = candidate.effect.restrictiveness <= rule.effect.restrictiveness
            return None if stricter else candidate_index
    return None


def _check(
    rule: Rule,
    index: int,
    rules: Sequence[Rule],
    group: Group,
) -> str | None:
    conditions = set(rule.conditions)
    for earlier_index in _candidates(rule, index, group, overlap=False):
        earlier = rules[earlier_index]
        if not set(earlier.conditions) <= conditions or not _first_keys_meet(rule, earlier):
            continue
        if _never_alone(rule, earlier):
            if earlier.effect == rule.effect:
                consequence = "with the same effect, so this line is redundant"
            elif rule.direction == "invoke":
                consequence = (
                    f"so the call is {'allowed' if earlier.effect.kind == 'allow' else 'denied'}"
                )
            elif rule.target == "provenance":
                consequence = f"so provenance is {_leaves(earlier.effect)}"
            else:
                consequence = f"so what it names leaves {_leaves(earlier.effect)}"
            return (
                f"{rule.source}: rule never decides: line {earlier.line} (`{_short(earlier)}`) "
                f"decides first wherever it applies, {consequence}: remove this line, or narrow "
                f"line {earlier.line}"
            )
    # A rule that names a field (its pattern ends in a key: `**.ssn`, `*.ssn`) and that a
    # broader, less strict rule overrides on an ancestor: `patient, allow` before `**.ssn, deny`.
    # A catch-all (`**, deny`) under specific allows is deliberate and not warned about.
    if rule.target != "fields" or rule.direction == "invoke":
        return None
    if rule.pattern[-1].kind != paths.LITERAL:
        return None
    found: list[tuple[int, int, int, list[str | None]]] = []
    candidates = list(_candidates(rule, index, group, overlap=True))
    for earlier_index in candidates:
        earlier = rules[earlier_index]
        if earlier.effect.restrictiveness <= rule.effect.restrictiveness:
            continue  # the earlier rule is at least as strict: nothing leaves that R would keep
        if not set(earlier.conditions) <= conditions or not _first_keys_meet(rule, earlier):
            continue
        for below in _BELOW:  # covered through an ancestor that the earlier rule matches
            example = _search(rule.pattern, earlier.pattern + below, included=False)
            if example is not None:
                leniency = -earlier.effect.restrictiveness[0]  # allow (in the clear) first
                found.append((len(example), leniency, earlier_index, example))
                break
        if len(found) >= _MAX_EXAMPLES:
            break
    found.sort(key=lambda item: item[:3])
    confirmed: list[tuple[int, list[str | None]]] = []
    for position, (_, _, earlier_index, example) in enumerate(found):
        # where the earlier rule, or another less strict one, really decides the example
        if any(example == seen for _, seen in confirmed):
            continue
        decider = _decider(rule, rules, candidates, rules[earlier_index], example)
        if decider is not None:
            confirmed.append((decider, example))
            if len(confirmed) == _SHOWN:
                unchecked = len(found) - position - 1
                break
    else:
        unchecked = 0
    if not confirmed:
        return None
    shown = [
        f"{_render(example)} (line {rules[i].line}, `{_short(rules[i])}`: "
        f"{_leaves(rules[i].effect)})"
        for i, example in confirmed
    ]
    more = f" and perhaps {unchecked} more" if unchecked else ""
    first = _render(confirmed[0][1])
    return (
        f"{rule.source}: `{_short(rule)}` does not decide where a broader, less strict rule "
        f"covers the field first: {', '.join(shown)}{more}; to have such a field "
        f"{_leaves(rule.effect)}, add a rule for it itself (e.g. `{first}, {rule.values[5]}`)"
    )
