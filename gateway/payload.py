"""Structured payloads: canonical bytes, digests and the limits checked before any policy runs.

Canonical JSON has versions, and every record and signed body names the one it was made with:

    1  json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False), UTF-8: what
       Fedgate wrote before versions existed. Kept so that everything written under it verifies.
    2  RFC 8785, the JSON Canonicalization Scheme (JCS): keys sorted by UTF-16 code units,
       numbers as ECMAScript prints them, UTF-8, no whitespace. What new writes use.

Version 2 is encoded with orjson (compiled; sorted keys, the same string escaping as JCS), and a
walk over the values (building nothing) proves its bytes are already JCS. Only a value that holds
a number orjson prints differently (an integral, very large or very small float), a key outside
the Basic Multilingual Plane (which sorts differently) or a type orjson would write its own way
takes the slower exact path, which hands orjson the JCS text of each such number. Integers must
lie within +-(2**53 - 1), the range a JSON number holds exactly (RFC 7493): JCS reads every
number as an IEEE double.

Digests are of canonical bytes: `sha256:<hex>` in the clear, `hmac-sha256:<hex>` keyed (a digest
that leaves the gateway about a withheld value must be keyed or salted, so it is no dictionary
oracle).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import secrets
import uuid
from pathlib import Path
from typing import Any

import orjson

from gateway.data_folder import private_secret
from gateway.errors import ConfigError, InvalidArgument, PayloadLimitExceeded

JsonObject = dict[str, Any]

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_FIELDS = 10_000

CANONICAL_V1 = 1
CANONICAL_V2 = 2
CANONICAL_VERSIONS = frozenset({CANONICAL_V1, CANONICAL_V2})
# The version of everything written from now on.
CANONICAL_VERSION = CANONICAL_V2

MAX_SAFE_INTEGER = 2**53 - 1
DIGEST_KEY_FILE = "digest.key"
DIGEST_KEY_BYTES = 32


def canonical_json(value: Any) -> bytes:
    """Canonical JSON version 1 (sorted keys, no spaces, UTF-8): records and receipts before v2.

    Also the input of pseudonyms, which must stay stable across versions.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def jcs(value: Any) -> bytes:
    """Canonical JSON version 2: the RFC 8785 (JCS) bytes of `value`.

    Raises ValueError for a number JSON cannot carry exactly (NaN, infinity, an integer beyond
    +-(2**53 - 1)) and TypeError for a value that is not JSON (a non-string key, an object).
    """
    kind = type(value)
    if kind is dict or kind is list or kind is tuple:
        try:
            encoded = orjson.dumps(value, option=_ORJSON_STRICT)
        except TypeError:
            pass  # a subclass, a huge integer, a non-string key...: the exact path decides
        else:
            if _orjson_is_jcs(value, check_keys=not encoded.isascii()):
                return encoded
    fixed = _jcs_ready(value)
    return orjson.dumps(value if fixed is _SAME else fixed, option=orjson.OPT_SORT_KEYS)


def canonical_bytes(value: Any, version: int = CANONICAL_VERSION) -> bytes:
    """The canonical JSON of `value` under `version` (1 or 2)."""
    if version == CANONICAL_V2:
        return jcs(value)
    if version == CANONICAL_V1:
        return canonical_json(value)
    raise InvalidArgument(unknown_canonical_version(version))


def unknown_canonical_version(version: Any) -> str:
    return (
        f"canonical JSON version {version!r} is unknown (this gateway knows "
        f"{', '.join(str(v) for v in sorted(CANONICAL_VERSIONS))}): upgrade the gateway"
    )


def sha256_digest(data: bytes) -> str:
    """'sha256:<hex>' of bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hmac_digest(key: bytes, data: bytes) -> str:
    """'hmac-sha256:<hex>' of bytes under `key`."""
    return "hmac-sha256:" + hmac.digest(key, data, "sha256").hex()


def digest(value: Any, version: int = CANONICAL_VERSION) -> str:
    """SHA-256 of the canonical JSON, as 'sha256:<hex>'."""
    return sha256_digest(canonical_bytes(value, version))


def keyed_digest(key: bytes, value: Any, version: int = CANONICAL_VERSION) -> str:
    """HMAC-SHA256 of the canonical JSON under `key`, as 'hmac-sha256:<hex>'.

    For digests that may leave the gateway (pre-filter digests in an export): without the key,
    nobody can confirm a guessed value against it.
    """
    return hmac_digest(key, canonical_bytes(value, version))


def load_or_create_digest_key(data_dir: str | Path) -> bytes:
    """The gateway's local 32-byte key for keyed digests (`digest.key` in the data folder).

    Created 0600 on first use (written whole under a temporary name, then linked into place, so a
    crash never leaves half a key and two processes end up with the same one). Refused when others
    may read it or it is not 32 bytes.
    """
    path = Path(data_dir) / DIGEST_KEY_FILE
    key = private_secret(path, lambda: secrets.token_bytes(DIGEST_KEY_BYTES), "digest key")
    if len(key) != DIGEST_KEY_BYTES:
        raise ConfigError(
            f"{path}: the digest key must hold {DIGEST_KEY_BYTES} bytes, it holds {len(key)}: "
            "restore it from a backup (keyed digests already written need the same key)"
        )
    return key


# ---- JCS (canonical version 2) ----

_SAME: Any = object()  # "this value needs no change" from _jcs_ready


# orjson options of the fast path: sorted keys; and refuse (so the exact path decides) integers
# beyond +-(2**53 - 1) and the types orjson would otherwise write in its own way.
_ORJSON_STRICT = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_STRICT_INTEGER
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _float_is_plain(number: float) -> bool:
    """True when orjson prints `number` exactly as JCS does (a plain, non-integral decimal)."""
    return 1e-4 <= abs(number) < 1e15 and not number.is_integer()


def _orjson_is_jcs(
    value: dict[str, Any] | list[Any] | tuple[Any, ...], *, check_keys: bool
) -> bool:
    """True when orjson's sorted-key bytes for `value` (which it encoded under _ORJSON_STRICT)
    are its JCS bytes, found by a walk that builds nothing.

    orjson escapes strings as JCS does and prints integers alike (_ORJSON_STRICT refused those
    beyond 2**53); it prints a float differently only when it is integral, below 1e-4 or from
    1e15 up, and writes NaN and infinities as null. It sorts keys by code point, which is UTF-16
    order unless a key holds a character outside the BMP: impossible when its bytes were all
    ASCII (`check_keys` False).
    """
    stack: list[Any] = [value]
    pop, push = stack.pop, stack.append
    while stack:
        container = pop()
        if type(container) is dict:
            if check_keys:
                keys = "".join(container)
                if not keys.isascii() and max(keys) > "\uffff":
                    return False
            items = container.values()
        else:
            items = container
        for item in items:
            kind = type(item)
            if kind is str or kind is int or item is None or kind is bool:
                continue
            if kind is float:
                # Plain and non-integral (NaN and infinities fail every comparison).
                if (1e-4 <= item < 1e15 or -1e15 < item <= -1e-4) and item % 1.0:
                    continue
                return False
            if kind is dict or kind is list or kind is tuple:
                push(item)
                continue
            return False  # an Enum or UUID that orjson wrote natively: the exact path decides
    return True


def _jcs_ready(value: Any) -> Any:
    """`value` with every number orjson would print differently replaced by its JCS text (an
    orjson.Fragment), and objects with keys outside the BMP encoded in UTF-16 order; _SAME when
    nothing changes. Containers are copied only on the path to a change."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return _SAME
    if kind is int:
        _check_integer(value)
        return _SAME
    if kind is float:
        return _SAME if _float_is_plain(value) else orjson.Fragment(es6_number(value))
    if kind is dict:
        changed: dict[str, Any] | None = None
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            fixed = _jcs_ready(item)
            if fixed is not _SAME:
                if changed is None:
                    changed = dict(value)
                changed[key] = fixed
        source = value if changed is None else changed
        keys = "".join(source)
        if not keys.isascii() and max(keys) > "\uffff":
            return _utf16_sorted_object(source)
        return _SAME if changed is None else changed
    if kind is list or kind is tuple:
        replaced: list[Any] | None = None
        for index, item in enumerate(value):
            fixed = _jcs_ready(item)
            if fixed is not _SAME:
                if replaced is None:
                    replaced = list(value)
                replaced[index] = fixed
        return _SAME if replaced is None else replaced
    # Subclasses (an IntEnum, a str subclass) and the types orjson writes natively (UUID, Enum):
    # the JSON value they stand for, as orjson gives it.
    if isinstance(value, enum.Enum):
        inner = value.value
        fixed = _jcs_ready(inner)
        return inner if fixed is _SAME else fixed
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        _check_integer(value)
        return int(value)
    if isinstance(value, float):
        number = float(value)
        return number if _float_is_plain(number) else orjson.Fragment(es6_number(number))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict | list | tuple):
        plain = dict(value) if isinstance(value, dict) else list(value)
        fixed = _jcs_ready(plain)
        return plain if fixed is _SAME else fixed
    raise TypeError(f"{type(value).__name__} is not JSON")


def _utf16_sorted_object(source: dict[str, Any]) -> orjson.Fragment:
    """An object whose keys orjson would sort differently from JCS, encoded member by member."""
    members = [
        orjson.dumps(key) + b":" + orjson.dumps(source[key], option=orjson.OPT_SORT_KEYS)
        for key in sorted(source, key=lambda key: key.encode("utf-16-be", "surrogatepass"))
    ]
    return orjson.Fragment(b"{" + b",".join(members) + b"}")


def _check_integer(value: int) -> None:
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise ValueError(
            f"integer {value} is beyond +-(2**53 - 1), which a JSON number cannot carry exactly: "
            "send it as a string"
        )


def es6_number(value: float) -> str:
    """`value` as ECMAScript's Number.prototype.toString prints it (RFC 8785 section 3.2.2.3).

    Python's repr gives the same shortest round-trip digits; only the notation differs.
    """
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a JSON number (JSON has no NaN or infinity)")
    if value == 0:
        return "0"  # also -0.0
    text = repr(value)
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    significant = digits.lstrip("0")
    # ECMAScript's n: the value is 0.<digits> * 10**point.
    point = len(whole) - (len(digits) - len(significant)) + (int(exponent) if exponent else 0)
    significant = significant.rstrip("0")
    count = len(significant)
    if count <= point <= 21:
        return sign + significant + "0" * (point - count)
    if 0 < point <= 21:
        return f"{sign}{significant[:point]}.{significant[point:]}"
    if -6 < point <= 0:
        return f"{sign}0.{'0' * -point}{significant}"
    power = point - 1
    head = significant[0] + (f".{significant[1:]}" if count > 1 else "")
    return f"{sign}{head}e{'+' if power >= 0 else '-'}{abs(power)}"


def check_limits(
    payload: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_fields: int = DEFAULT_MAX_FIELDS
) -> None:
    """Refuse a payload deeper than max_depth or with more than max_fields values.

    Iterative on purpose: a payload nested 10,000 deep must not exhaust the Python stack.
    """
    stack: list[tuple[Any, int]] = [(payload, 0)]
    fields = 0
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise PayloadLimitExceeded(
                f"payload is nested deeper than {max_depth} levels: flatten it or raise "
                "[limits] max_payload_depth"
            )
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value  # type: ignore[assignment]
        else:
            continue
        for child in children:
            fields += 1
            if fields > max_fields:
                raise PayloadLimitExceeded(
                    f"payload has more than {max_fields} fields: send less or raise "
                    "[limits] max_payload_fields"
                )
            stack.append((child, depth + 1))


def files_as_digests(payload: Any) -> Any:
    """The payload with each file's bytes replaced by their digest (`sha256:<hex>` of the
    decoded bytes): what an audit record may keep of a payload that holds files (an A2A file
    part, docs/a2a.md §1, maps to {"file": {..., "bytes": <base64>}}). Files are never stored."""
    if isinstance(payload, list):
        return [files_as_digests(item) for item in payload]
    if not isinstance(payload, dict):
        return payload
    kept = {key: files_as_digests(value) for key, value in payload.items()}
    file = payload.get("file")
    if isinstance(file, dict) and isinstance(file.get("bytes"), str):
        try:
            raw = base64.b64decode(file["bytes"], validate=True)
        except (binascii.Error, ValueError):
            raw = file["bytes"].encode()
        kept["file"] = {**file, "bytes": "sha256:" + hashlib.sha256(raw).hexdigest()}
    return kept
