"""Canonical JSON, byte for byte as the spec signs it: sorted, compact, UTF-8, no floats."""

from __future__ import annotations

import pytest

from olmstead.olm.canonical_json import canonical_json


def test_the_spec_s_form() -> None:
    value = {"b": [1, {"d": None, "c": True}], "a": "é\u2028", "0": -(2**53 - 1)}
    expected = '{"0":-9007199254740991,"a":"é\u2028","b":[1,{"c":true,"d":null}]}'
    assert canonical_json(value) == expected.encode("utf-8")


@pytest.mark.parametrize("value", [1.5, {"a": [0.0]}, {"a": {"b": float("nan")}}])
def test_floats_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="float"):
        canonical_json(value)


def test_a_part_shared_twice_is_fine_and_a_cycle_is_refused() -> None:
    shared = {"x": 1}
    assert canonical_json({"a": shared, "b": [shared]}) == b'{"a":{"x":1},"b":[{"x":1}]}'
    looped: dict[str, object] = {"a": 1}
    looped["self"] = looped  # built locally by mistake: an error, not a hang
    with pytest.raises(ValueError, match="Circular"):
        canonical_json(looped)
