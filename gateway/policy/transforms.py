"""Effects of sharing rules and the transforms that let a field leave changed.

    allow            the value leaves as is
    deny             the field is withheld (removed from the output)
    mask[:N]         keep the last N characters (default 4), the rest become '*'
    pseudonymize[:S] 'pseu_' + 32 hex of HMAC-SHA256(gateway key, scope + value): stable within
                     one scope, unlinkable across scopes. The scope is the peer org, the
                     requester's purpose and either the rule's field (direction, agent, skill,
                     pattern) or, with `:S`, the author's scope name S (rules that share a name
                     give linkable pseudonyms, across fields and skills, on purpose)
    generalize:year  an ISO date or date-time string becomes its year ('1984')
    generalize:N     a number becomes the range of width N holding it ('40-49' for N=10)

A transform returns None when it cannot apply (wrong type, nothing to hide, a result equal to the
original): the caller then withholds the field. A transformed value never equals the original.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from gateway.payload import canonical_json

ALLOW = "allow"
DENY = "deny"
MASK = "mask"
PSEUDONYMIZE = "pseudonymize"
GENERALIZE_YEAR = "generalize:year"
GENERALIZE_RANGE = "generalize:range"

DEFAULT_MASK_KEEP = 4
PSEUDONYM_PREFIX = "pseu_"
PSEUDONYM = re.compile(r"pseu_[0-9a-f]{32}")
EFFECT_HELP = "use allow, deny, mask[:N], pseudonymize[:SCOPE], generalize[:year|N]"
SCOPE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_PSEUDONYM_DOMAIN = b"fedgate-pseudonym/2\x00"

# The action reported for a field whose rule has this effect and whose transform applied.
ACTION_OF = {
    ALLOW: "allowed",
    DENY: "withheld",
    MASK: "masked",
    PSEUDONYMIZE: "pseudonymized",
    GENERALIZE_YEAR: "generalized",
    GENERALIZE_RANGE: "generalized",
}
_MAX_PARAMETER = 1_000_000_000
_dumps = json.JSONEncoder(ensure_ascii=False).encode


@dataclass(frozen=True)
class Effect:
    """A parsed effect: its kind and its parameter (mask: characters kept; range: width)."""

    kind: str
    parameter: int = 0
    scope: str = ""  # pseudonymize:SCOPE: the author's scope name

    @property
    def restrictiveness(self) -> tuple[int, int]:
        """Smaller is more restrictive: deny, pseudonymize, mask, generalize, allow."""
        order = {DENY: 0, PSEUDONYMIZE: 1, MASK: 2, GENERALIZE_YEAR: 3, GENERALIZE_RANGE: 4}
        rank = order.get(self.kind, 5)
        if self.kind == MASK:
            return rank, self.parameter  # keeping fewer characters is more restrictive
        if self.kind == GENERALIZE_RANGE:
            return rank, -self.parameter  # wider ranges are more restrictive
        return rank, 0

    def __str__(self) -> str:
        if self.kind == MASK:
            return f"mask:{self.parameter}"
        if self.kind == GENERALIZE_RANGE:
            return f"generalize:{self.parameter}"
        if self.kind == PSEUDONYMIZE and self.scope:
            return f"pseudonymize:{self.scope}"
        return self.kind


def parse_effect(text: str) -> Effect:
    """Parse an effect; raises ValueError with the fix."""
    name, colon, parameter = text.strip().partition(":")
    if name == ALLOW and not colon:
        return Effect(ALLOW)
    if name == DENY and not colon:
        return Effect(DENY)
    if name == PSEUDONYMIZE:
        if not colon:
            return Effect(PSEUDONYMIZE)
        if SCOPE_NAME.fullmatch(parameter):
            return Effect(PSEUDONYMIZE, scope=parameter)
        raise ValueError(
            f"pseudonymize takes a scope name of lowercase letters, digits, '-' and '_', got "
            f"{text!r} (e.g. pseudonymize:insurance-id)"
        )
    if name == MASK:
        if not colon:
            return Effect(MASK, DEFAULT_MASK_KEEP)
        if parameter.isdigit() and int(parameter) <= _MAX_PARAMETER:
            return Effect(MASK, int(parameter))
        raise ValueError(f"mask takes the number of characters kept, got {text!r} (e.g. mask:4)")
    if name == "generalize":
        if not colon or parameter == "year":
            return Effect(GENERALIZE_YEAR)
        if parameter.isdigit() and 0 < int(parameter) <= _MAX_PARAMETER:
            return Effect(GENERALIZE_RANGE, int(parameter))
        raise ValueError(
            f"generalize takes 'year' or a positive range width, got {text!r} "
            "(e.g. generalize:year, generalize:10)"
        )
    raise ValueError(f"unknown effect {text.strip()!r} ({EFFECT_HELP})")


def mask(value: Any, keep: int) -> str | None:
    """Keep the last `keep` characters of a string or integer; None when nothing would be hidden."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = value if isinstance(value, str) else str(value)
    hidden = len(text) - keep
    if hidden <= 0:
        return None
    masked = "*" * hidden + (text[-keep:] if keep else "")
    return None if masked == value else masked


def pseudonym_context(peer: str, scope: tuple[str, ...] = ()) -> bytes:
    """What a pseudonym is bound to beside the value: the peer and the scope, unambiguously."""
    context = _dumps([peer, *scope]).encode("utf-8", "surrogatepass")
    return _PSEUDONYM_DOMAIN + context + b"\x00"


def pseudonym(text: str, key: bytes, context: bytes) -> str:
    """The keyed pseudonym of a canonical JSON text within a context (pseudonym_context)."""
    message = context + text.encode("utf-8", "surrogatepass")
    return PSEUDONYM_PREFIX + hmac.digest(key, message, "sha256").hex()[:32]


def pseudonymize(
    value: Any, key: bytes, peer: str, scope: tuple[str, ...] = (), *, context: bytes = b""
) -> str | None:
    """A keyed pseudonym of a string or number: stable for one (peer, scope) and unlinkable
    across peers and scopes (the filter passes purpose and field, or the author's scope name;
    `context`, when given, is pseudonym_context(peer, scope) computed once)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    # For a string, json.dumps without options gives the same bytes as canonical_json, faster.
    text = _dumps(value) if isinstance(value, str) else canonical_json(value).decode("utf-8")
    token = pseudonym(text, key, context or pseudonym_context(peer, scope))
    return None if token == value else token


def pseudonymize_key(name: str, key: bytes, context: bytes) -> str:
    """The pseudonym an object key leaves as, under `keys(...), pseudonymize` (never the key);
    `context` is pseudonym_context(peer, ("keys", *scope))."""
    return pseudonym(_dumps(name), key, context)


def generalize_year(value: Any) -> str | None:
    """The year of an ISO date or date-time string."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        year = (
            dt.date.fromisoformat(text).year
            if len(text) == 10
            else dt.datetime.fromisoformat(text).year
        )
    except ValueError:
        return None
    result = f"{year:04d}"
    return None if result == value else result


def generalize_range(value: Any, width: int) -> str | None:
    """The range of width `width` holding a number, written first-last ('40-49')."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    low = (value // width) * width if isinstance(value, int) else math.floor(value / width) * width
    return f"{low}-{low + width - 1}"


def apply(
    effect: Effect, value: Any, key: bytes, peer: str, scope: tuple[str, ...] = ()
) -> Any | None:
    """The value that leaves under a transform effect, or None to withhold the field."""
    if effect.kind == MASK:
        return mask(value, effect.parameter)
    if effect.kind == PSEUDONYMIZE:
        return pseudonymize(value, key, peer, scope)
    if effect.kind == GENERALIZE_YEAR:
        return generalize_year(value)
    if effect.kind == GENERALIZE_RANGE:
        return generalize_range(value, effect.parameter)
    raise AssertionError(f"not a transform: {effect}")
