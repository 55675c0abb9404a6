"""Field paths and path patterns of the sharing policy: parsing, rendering, matching, precedence.

A path names a field of a JSON object payload. Three spellings share one grammar:

    concrete path    patient.address.zip   items[2].price   ["odd.key"].x
    normalized path  patient.address.zip   items[].price    ["odd.key"].x   (indices dropped)
    pattern          patient.*   items[].price   **.ssn   (`*` one object key, `**` any depth)

A key made only of letters, digits and `_ $ @ : + ~ -` is written bare; any other key is written
as a JSON string in brackets (`["a.b"]`), so a key containing a dot can never pose as a nested
path. `[]` stands for every element of an array; in a pattern it is as literal as a key.

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
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

SIMPLE_KEY = re.compile(r"[\w$@:+~-]+")
_INDEX = re.compile(r"\[(\d+)\]")

# Kinds of pattern segments.
LITERAL = 0  # one named object key
ELEMENT = 1  # `[]`: an array element (any index)
ANY_KEY = 2  # `*`: exactly one object key
ANY_DEPTH = 3  # `**`: zero or more segments of any kind

# Rank of each kind for precedence (smaller = more specific); END ranks a pattern's end.
_RANK = {LITERAL: 0, ELEMENT: 0, ANY_KEY: 1, ANY_DEPTH: 2}
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
    if SIMPLE_KEY.fullmatch(key):
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


def _parse(text: str, *, pattern: bool, concrete: bool) -> list[Segment]:
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
            elif pattern and text.startswith("*", pos):
                segments.append(Segment(ANY_KEY))
                pos += 1
            else:
                match = SIMPLE_KEY.match(text, pos)
                if match is None:
                    where = f"position {pos}" if pos < length else "the end"
                    raise PathSyntaxError(f"expected a key at {where}")
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
            else:
                matched = item == segment.key
            if matched:
                following.add(position + 1)
        if not following:
            return False
        positions = following
    return True


def sort_key(pattern: Pattern) -> tuple[int, ...]:
    """Precedence of a pattern: smaller tuples are more specific and decide first."""
    return (*(_RANK[segment.kind] for segment in pattern), _END)
