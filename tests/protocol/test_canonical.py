"""Canonical JSON versions and digests: version 2 is RFC 8785 exactly, version 1 is unchanged.

The reference for version 2 is Trail of Bits' rfc8785 (pure Python, written from the RFC): our
orjson-based encoder must give the same bytes for every JSON value, and refuse what it refuses.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, InvalidArgument
from gateway.payload import (
    CANONICAL_V1,
    CANONICAL_V2,
    DIGEST_KEY_FILE,
    canonical_bytes,
    canonical_json,
    digest,
    es6_number,
    jcs,
    keyed_digest,
    load_or_create_digest_key,
)

SAFE = 2**53 - 1
# Text that exercises JCS where it differs from naive encoders: controls, non-BMP, BMP above the
# surrogates (sorts after them in UTF-16), quotes and backslashes.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\U0001f600", "\ufb33", "\ue000", "\x00", "\x1f", "\x7f", '"', "\\"]),
    ),
    max_size=12,
)
NUMBERS = st.one_of(
    st.integers(min_value=-SAFE, max_value=SAFE),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=600, deadline=None)
@given(JSON)
def test_version_2_is_rfc8785(value: Any) -> None:
    assert jcs(value) == rfc8785.dumps(value)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(TEXT, JSON, max_size=8))
def test_version_2_of_objects_is_rfc8785(value: dict[str, Any]) -> None:
    assert jcs(value) == rfc8785.dumps(value)
    assert canonical_bytes(value) == jcs(value)  # the version new writes use


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_print_as_ecmascript_does(number: float) -> None:
    assert es6_number(number).encode() == rfc8785.dumps(number)
    assert float(es6_number(number)) == number  # and read back exactly


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_version_1_is_unchanged(value: Any) -> None:
    """Everything written before versions existed still hashes to the same bytes."""
    expected = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    try:
        assert canonical_json(value) == expected
        assert canonical_bytes(value, CANONICAL_V1) == expected
    except UnicodeEncodeError:  # a lone surrogate: version 1 never could encode it
        pass


def test_every_float_is_printed_as_jcs_in_a_container() -> None:
    """The fast path (orjson's own bytes) is taken only where they are JCS: 20,000 doubles from
    random bit patterns, and each boundary of orjson's and ECMAScript's notations."""
    import random
    import struct

    rnd = random.Random(8785)
    numbers = [
        struct.unpack("<d", struct.pack("<Q", rnd.getrandbits(64)))[0] for _ in range(20_000)
    ]
    for exponent in range(-9, 23):
        for mantissa in (1.0, 1.5, 9.99, 9.999999999999998):
            numbers += [mantissa * 10.0**exponent, -mantissa * 10.0**exponent]
    finite = [n for n in numbers if math.isfinite(n)]
    for number in finite:
        assert jcs([number]) == rfc8785.dumps([number]), number
        assert jcs({"n": number, "m": [number, 0]}) == rfc8785.dumps(
            {"n": number, "m": [number, 0]}
        )


@pytest.mark.parametrize(
    "value",
    [
        {"text": "1e-5 and 2e+3 in a string", "n": 1},
        {"text": "version 1.0, then 2.0] and 3.0}", "n": [1, 2]},
        {"uuid": "3fa85f64-5717-4562-b3fc-2c963f6e-7f6a", "n": 2.5},
        {"\U0001f600": 1, "\ufb33": 2, "\ue000": 3, "a": {"\U0001f601": [1.0]}},
        ["😀 in a string only", {"k": "ü"}],
        ({"tuple": (1, 2.5)},),
    ],
)
def test_false_alarms_still_give_jcs(value: Any) -> None:
    assert jcs(value) == rfc8785.dumps(value)


def test_versions_differ_where_jcs_fixes_the_notation() -> None:
    value = {"n": [1.0, 1e16, 1e-7, -0.0], "\U0001f600": 1, "\ufb33": 2}
    assert canonical_json(value) == (
        b'{"n":[1.0,1e+16,1e-07,-0.0],"\xef\xac\xb3":2,"\xf0\x9f\x98\x80":1}'
    )
    assert jcs(value) == (
        b'{"n":[1,10000000000000000,1e-7,0],"\xf0\x9f\x98\x80":1,"\xef\xac\xb3":2}'
    )


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (math.nan, ValueError, "not a JSON number"),
        ([math.inf], ValueError, "not a JSON number"),
        ({"a": None, "b": [1, {"c": -math.inf}]}, ValueError, "not a JSON number"),
        ({"a": None, "b": math.nan}, ValueError, "not a JSON number"),
        ({"big": 2**53}, ValueError, "beyond"),
        ([-(2**53)], ValueError, "beyond"),
        ({1: "a"}, TypeError, "keys must be strings"),
        ({"a": {None: 1}}, TypeError, "keys must be strings"),
        ({"a": object()}, TypeError, "not JSON"),
        ({"a": b"bytes"}, TypeError, "not JSON"),
        ("\ud800", TypeError, "surrogates"),
    ],
)
def test_version_2_refuses_what_json_cannot_carry_exactly(
    value: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        jcs(value)


def test_unknown_version_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="canonical JSON version 3 is unknown"):
        canonical_bytes({}, 3)


def test_subclasses_and_orjson_types_encode_as_their_values() -> None:
    import dataclasses
    import datetime
    import enum
    import uuid

    class Kind(enum.StrEnum):
        A = "a"

    class Count(enum.IntEnum):
        TWO = 2

    class Ratio(float):
        pass

    class Plain(enum.Enum):
        X = 2.0

    class Data(dict):  # type: ignore[type-arg]
        pass

    assert jcs({"k": Kind.A, "c": Count.TWO, "r": Ratio(1.0), "t": (1, 2)}) == (
        b'{"c":2,"k":"a","r":1,"t":[1,2]}'
    )
    ident = uuid.UUID(int=1)
    assert jcs([Plain.X, ident, Data(b=1.0)]) == (
        b'[2,"00000000-0000-0000-0000-000000000001",{"b":1}]'
    )

    @dataclasses.dataclass
    class Point:
        x: int

    for not_json in (Point(1), datetime.date(2026, 1, 1)):
        with pytest.raises(TypeError, match="is not JSON"):
            jcs([not_json])


def test_digests() -> None:
    value = {"b": 1.0, "a": "x"}
    assert digest(value) == "sha256:" + __import__("hashlib").sha256(b'{"a":"x","b":1}').hexdigest()
    assert digest(value, CANONICAL_V1) != digest(value, CANONICAL_V2)
    key = b"k" * 32
    keyed = keyed_digest(key, value)
    assert keyed.startswith("hmac-sha256:") and len(keyed) == len("hmac-sha256:") + 64
    assert keyed != keyed_digest(b"j" * 32, value)
    assert keyed.removeprefix("hmac-sha256:") != digest(value).removeprefix("sha256:")


# -- the local digest key ---------------------------------------------------------------------


def test_digest_key_is_created_once_0600_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = load_or_create_digest_key(data)
    path = data / DIGEST_KEY_FILE
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_digest_key(data) == key
    assert not [p for p in data.iterdir() if p.name != DIGEST_KEY_FILE]  # no temporary left


def test_digest_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_digest_key(tmp_path)
    os.chmod(tmp_path / DIGEST_KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match=r"accessible to other users \(mode 644\).*chmod 600"):
        load_or_create_digest_key(tmp_path)


def test_digest_key_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DIGEST_KEY_FILE
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="must hold 32 bytes, it holds 5"):
        load_or_create_digest_key(tmp_path)
