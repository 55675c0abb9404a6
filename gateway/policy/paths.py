"""Field paths and path patterns of the sharing policy: parsing, rendering, matching, precedence.

A path names a field of a JSON object payload. Three spellings share one grammar:

    concrete path    patient.address.zip   items[2].price   ["odd.key"].x
    normalized path  patient.address.zip   items[].price    ["odd.key"].x   (indices dropped)
    pattern          patient.*   items[].price   **.ssn   (`*` one object key, `**` any depth)

A key made only of letters, digits and `_ $ @ : + ~ -` is written bare; any other key is written
as a JSON string in brackets (`["a.b"]`), so a key containing a dot can never pose as a nested
path. `[]` stands for every element of an array; in a pattern it is as literal as a key.

Reserved names (`@provenance`) are not payload keys: a rule writes one bare as its whole field
(and nowhere else), and a payload key of that spelling is always rendered quoted
(`["@provenance"]`), so it can never pose as the reserved name, nor a reserved name as it.

A *reported* path is what leaves the gateway about a field (withheld or transformed paths): a
concrete path in which every key that no rule names, and that the released output does not show,
is written `*` (guarantee 8: paths name only keys a rule names). `parse_reported` reads one.

A pattern *covers* a path when it matches the path or one of its ancestors: a rule on
`patient.address` decides `patient.address.zip` too.

Precedence (the most specific pattern first) compares patterns segment by segment, left to right:
a literal key or `[]` beats `*`, which beats `**`; at the first difference the more literal segment
wins; when one pattern is a prefix of the other, the longer (deeper) one wins. `sort_key` turns
that order into a tuple: smaller sorts first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

SIMPLE_KEY = re.compile(r"[\w$@:+~-]+")
PROVENANCE = "@provenance"
RESERVED_NAMES = frozenset({PROVENANCE})
HIDDEN_KEY = "*"  # a key of a reported path that may not be named
_INDEX = re.compile(r"\[(\d+)\]")

# Kinds of pattern segments.
LITERAL = 0  # one named object key
ELEMENT = 1  # `[]`: an array element (any index)
ANY_KEY = 2  # `*`: exactly one object key
ANY_DEPTH = 3  # `**`: zero or more segments of any kind
RESERVED = 4  # a reserved name (`@provenance`): the whole field of its rule, never a payload key

# Rank of each kind for precedence (smaller = more specific); END ranks a pattern's end.
_RANK = {LITERAL: 0, ELEMENT: 0, ANY_KEY: 1, ANY_DEPTH: 2, RESERVED: 0}
_END = 3

# A normalized path is a tuple of segments: a key (str) or ARRAY (None) for an array element.
ARRAY = None
PathSegments = tuple[str | None, ...]


@dataclass(frozen=True)
class Segment:
    kind: int
    key: str = ""


Pattern = tuple[Segment, ...]


class PathSyntaxError(ValueError):
    """A path or pattern does not follow the grammar; the message says where."""


def render_key(key: str, *, first: bool) -> str:
    """One object key as it appears in a path (bare when simple, else quoted in brackets)."""
    if SIMPLE_KEY.fullmatch(key) and key not in RESERVED_NAMES:
        return key if first else "." + key
    return "[" + json.dumps(key, ensure_ascii=False) + "]"


def render(segments: PathSegments) -> str:
    """A normalized path as text (`items[].price`)."""
    parts: list[str] = []
    for segment in segments:
        if segment is ARRAY:
            parts.append("[]")
        else:
            parts.append(render_key(segment, first=not parts))
    return "".join(parts)


def _parse(text: str, *, pattern: bool, concrete: bool, hidden: bool = False) -> list[Segment]:
    segments: list[Segment] = []
    pos = 0
    length = len(text)
    decoder = json.JSONDecoder()
    if not text:
        raise PathSyntaxError("empty path")
    while pos < length:
        char = text[pos]
        if char == "[":
            if text.startswith("[]", pos):
                if concrete:
                    raise PathSyntaxError(f"'[]' at position {pos}: a concrete path names indices")
                segments.append(Segment(ELEMENT))
                pos += 2
            elif pos + 1 < length and text[pos + 1] == '"':
                try:
                    key, end = decoder.raw_decode(text, pos + 1)
                except json.JSONDecodeError:
                    raise PathSyntaxError(f"unterminated quoted key at position {pos}") from None
                if not text.startswith("]", end):
                    raise PathSyntaxError(f"expected ']' at position {end}")
                segments.append(Segment(LITERAL, key))
                pos = end + 1
            else:
                match = _INDEX.match(text, pos)
                if match is None or not concrete:
                    raise PathSyntaxError(
                        f"unexpected '[' at position {pos}: use '[]' for every element or "
                        "'[\"key\"]' for a key with special characters"
                    )
                segments.append(Segment(ELEMENT, match.group(1)))
                pos = match.end()
            if len(segments) == 1 and segments[0].kind == ELEMENT:
                raise PathSyntaxError("a path starts with a key: the payload is an object")
        else:
            if segments:
                if char != ".":
                    raise PathSyntaxError(f"expected '.' or '[' at position {pos}, got {char!r}")
                pos += 1
            if pattern and text.startswith("**", pos):
                segments.append(Segment(ANY_DEPTH))
                pos += 2
            elif (pattern or hidden) and text.startswith("*", pos):
                segments.append(Segment(ANY_KEY))
                pos += 1
            else:
                match = SIMPLE_KEY.match(text, pos)
                if match is None:
                    where = f"position {pos}" if pos < length else "the end"
                    raise PathSyntaxError(f"expected a key at {where}")
                if match.group() in RESERVED_NAMES:
                    raise PathSyntaxError(
                        f"{match.group()!r} is a reserved name, not a payload key: a rule names "
                        f"it as its whole field; write a payload key of that name "
                        f"[{json.dumps(match.group())}]"
                    )
                segments.append(Segment(LITERAL, match.group()))
                pos = match.end()
            if pos < length and text[pos] not in ".[":
                raise PathSyntaxError(f"unexpected {text[pos]!r} at position {pos}")
    return segments


@lru_cache(maxsize=4096)
def parse_pattern(text: str) -> Pattern:
    """A field pattern as segments; raises PathSyntaxError."""
    return tuple(_parse(text, pattern=True, concrete=False))


@lru_cache(maxsize=16384)
def parse_normalized(text: str) -> PathSegments:
    """A normalized path (`items[].price`) as segments; raises PathSyntaxError."""
    return tuple(
        ARRAY if s.kind == ELEMENT else s.key for s in _parse(text, pattern=False, concrete=False)
    )


def normalize(concrete: str) -> str:
    """The normalized form of a concrete path: `items[2].price` -> `items[].price`."""
    segments = _parse(concrete, pattern=False, concrete=True)
    return render(tuple(ARRAY if s.kind == ELEMENT else s.key for s in segments))


def lookup(payload: Any, concrete: str) -> Any:
    """The value at a concrete path of a payload; raises KeyError or IndexError if absent."""
    value = payload
    for segment in _parse(concrete, pattern=False, concrete=True):
        value = value[int(segment.key)] if segment.kind == ELEMENT else value[segment.key]
    return value


def parse_concrete(concrete: str) -> tuple[str | int, ...]:
    """A concrete path (`items[2].price`) as keys (str) and indices (int); raises
    PathSyntaxError."""
    return tuple(
        int(s.key) if s.kind == ELEMENT else s.key
        for s in _parse(concrete, pattern=False, concrete=True)
    )


@lru_cache(maxsize=16384)
def concrete_prefixes(concrete: str) -> tuple[tuple[str | int, str], ...]:
    """Each segment of a concrete path with the concrete path up to and including it."""
    found: list[tuple[str | int, str]] = []
    text = ""
    for segment in parse_concrete(concrete):
        if isinstance(segment, int):
            text += f"[{segment}]"
        else:
            text += render_key(segment, first=not text)
        found.append((segment, text))
    return tuple(found)


def parse_reported(text: str) -> tuple[str | int | None, ...]:
    """A reported path (concrete, with `*` for a key that may not be named) as keys (str),
    indices (int) and None for each hidden key; raises PathSyntaxError. For receivers that
    validate the paths a peer reports."""
    return tuple(
        None if s.kind == ANY_KEY else int(s.key) if s.kind == ELEMENT else s.key
        for s in _parse(text, pattern=False, concrete=True, hidden=True)
    )


def render_concrete(segments: Sequence[str | int | None]) -> str:
    """Keys, indices and hidden keys (None) as a concrete or reported path."""
    parts: list[str] = []
    for segment in segments:
        if segment is None:
            parts.append(HIDDEN_KEY if not parts else "." + HIDDEN_KEY)
        elif isinstance(segment, int):
            parts.append(f"[{segment}]")
        else:
            parts.append(render_key(segment, first=not parts))
    return "".join(parts)


def render_pattern(pattern: Pattern) -> str:
    """A pattern in its canonical spelling (`items[].price`, `**.ssn`)."""
    parts: list[str] = []
    for segment in pattern:
        if segment.kind == ELEMENT:
            parts.append("[]")
        elif segment.kind == LITERAL:
            parts.append(render_key(segment.key, first=not parts))
        else:
            parts.append(("." if parts else "") + ("*" if segment.kind == ANY_KEY else "**"))
    return "".join(parts)


def _step(pattern: Pattern, states: set[int], item: str | None) -> set[int]:
    """The NFA positions of a pattern after one more path segment (closure applied before)."""
    following: set[int] = set()
    size = len(pattern)
    for position in _closure(pattern, states):
        if position >= size:
            continue
        segment = pattern[position]
        kind = segment.kind
        if kind == ANY_DEPTH:
            following.add(position)
        elif kind == ELEMENT:
            if item is ARRAY:
                following.add(position + 1)
        elif kind == ANY_KEY:
            if item is not ARRAY:
                following.add(position + 1)
        elif kind == LITERAL and item == segment.key:
            following.add(position + 1)
    return following


def _closure(pattern: Pattern, states: set[int]) -> set[int]:
    """Positions plus those reached by letting a `**` match nothing."""
    closed = set(states)
    pending = list(states)
    while pending:
        position = pending.pop()
        at_any_depth = position < len(pattern) and pattern[position].kind == ANY_DEPTH
        if at_any_depth and position + 1 not in closed:
            closed.add(position + 1)
            pending.append(position + 1)
    return closed


def matches(pattern: Pattern, path: PathSegments) -> bool:
    """Whether the pattern matches the path exactly (not an ancestor of it)."""
    states = {0}
    for item in path:
        states = _step(pattern, states, item)
        if not states:
            return False
    return len(pattern) in _closure(pattern, states)


def named_keys(patterns: Sequence[Pattern], path: PathSegments) -> tuple[bool, ...]:
    """For each segment of a normalized path, whether a pattern names it literally there: some
    pattern's prefix that ends in that literal key matches the path up to it exactly."""
    named = [False] * len(path)
    for pattern in patterns:
        states = {0}
        size = len(pattern)
        for index, item in enumerate(path):
            if item is not ARRAY and not named[index]:
                for position in _closure(pattern, states):
                    if position < size:
                        segment = pattern[position]
                        if segment.kind == LITERAL and segment.key == item:
                            named[index] = True
                            break
            states = _step(pattern, states, item)
            if not states:
                break
    return tuple(named)


def covers(pattern: Pattern, path: PathSegments) -> bool:
    """Whether the pattern matches the path or one of its ancestors."""
    positions = {0}
    size = len(path)
    for segment in pattern:
        if segment.kind == ANY_DEPTH:
            positions = set(range(min(positions), size + 1))
            continue
        following: set[int] = set()
        for position in positions:
            if position >= size:
                continue
            item = path[position]
            if segment.kind == ELEMENT:
                matched = item is ARRAY
            elif segment.kind == ANY_KEY:
                matched = item is not ARRAY
            else:  # a reserved name never matches a payload key
                matched = segment.kind == LITERAL and item == segment.key
            if matched:
                following.add(position + 1)
        if not following:
            return False
        positions = following
    return True


def sort_key(pattern: Pattern) -> tuple[int, ...]:
    """Precedence of a pattern: smaller tuples are more specific and decide first."""
    return (*(_RANK[segment.kind] for segment in pattern), _END)
