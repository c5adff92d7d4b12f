"""Hypothesis strategies that damage a valid JSON object the ways a hostile party would.

``mutated(valid, pool)`` draws one to three mutations of ``valid``, each at a
path drawn from every object member and array item in it (the root included):

- the value replaced by one of another type or out of range: ``null``, booleans,
  huge and negative integers, ``±Infinity`` and ``NaN``, strings with NUL or a lone
  surrogate, empty and nested containers, deep nesting;
- for strings: NUL and lone surrogates spliced in, cuts, growth, bad base64, base64
  keys of every length from 0 to 70 bytes (33 is the length vodozemac 0.10 panics
  on), other real keys and IDs from ``pool``
  (spoofed senders, devices and keys);
- a member deleted, or an unknown member added;
- a member renamed (to a key of any length, or a damaged name); where the name is
  ``<algorithm>:<its value>`` (a cross-signing key's ID), name and value are
  changed together, so a key of the wrong length passes the ID check and reaches
  vodozemac.

Add a kind of damage here and every registered input gets it.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from hypothesis import strategies as st

Path = tuple[str | int, ...]

HUGE = [-1, -(2**63), 2**63, 2**64, 10**30, -(10**30)]


def paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every place in ``value`` a mutation can hit, the root first."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(paths(item, (*prefix, index)))
    return found


def b64_of(size: int, fill: int = 1) -> str:
    return base64.b64encode(bytes([fill]) * size).decode().rstrip("=")


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HUGE),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "\ud800", "a\udfffb", "x" * 5000, "@", "!:", "AAAA", "====", "*"]),
)

hostile_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
    st.integers(min_value=1, max_value=120).map(nested),
    st.builds(b64_of, st.integers(min_value=0, max_value=70), st.integers(0, 255)),
)


#: base64 keys of every length, the lengths next to a key's 32 bytes most often
keys = st.builds(
    b64_of,
    st.one_of(st.sampled_from([0, 31, 32, 33, 34, 64, 65]), st.integers(0, 70)),
    st.integers(0, 255),
) | st.builds(lambda n: b64_of(n) + "=", st.integers(0, 40))


def bad_strings(original: str) -> st.SearchStrategy[str]:
    """``original`` with NUL or a lone surrogate in it, cut, or grown past any limit."""
    return st.one_of(
        st.builds(
            lambda at, bad: original[:at] + bad + original[at:],
            st.integers(0, len(original)),
            st.sampled_from(["\x00", "\ud800", "\udfff", "\u0000\ud83d"]),
        ),
        st.integers(0, max(0, len(original) - 1)).map(lambda n: original[:n]),
        st.sampled_from([original * 300, original + "=", original.upper(), " " + original]),
    )


numbers = st.one_of(
    st.sampled_from([*HUGE, 2, 7, 255, 256]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)


def _put(value: Any, where: Path, new: Any) -> Any:
    if not where:
        return new
    _get(value, where[:-1])[where[-1]] = new
    return value


def _get(value: Any, path: Path) -> Any:
    for part in path:
        value = value[part]
    return value


@st.composite
def mutated(draw: st.DrawFn, valid: Any, pool: list[str]) -> tuple[Any, list[str]]:
    """``valid`` with one to three mutations; also how it was changed, for reports."""
    value = copy.deepcopy(valid)
    done: list[str] = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from(paths(value)))
        target = _get(value, where)
        choices = ["replace", "pool"]
        if isinstance(target, dict):
            choices.append("add")
        if where:
            choices.append("delete")
        if where and isinstance(where[-1], str):
            choices.append("rename")
        if isinstance(target, str):
            choices += ["key", "key"]  # keys of every length, often: where panics hide
            choices.append("string")  # what JSON carries and no store holds
        if isinstance(target, int):
            choices.append("number")
        kind = draw(st.sampled_from(choices))
        new: Any
        if kind == "key":
            kind, new = "replace", draw(keys)
            value = _put(value, where, new)
        elif kind == "string":
            kind, new = "replace", draw(bad_strings(target))
            value = _put(value, where, new)
        elif kind == "number":
            kind, new = "replace", draw(numbers)
            value = _put(value, where, new)
        elif kind == "add":
            target[draw(st.text(max_size=8))] = draw(hostile_values)
        elif kind == "rename":
            parent, name = _get(value, where[:-1]), str(where[-1])
            prefix, _, suffix = name.rpartition(":")
            if prefix and isinstance(target, str) and suffix == target:
                new = draw(keys)
                renamed = f"{prefix}:{new}"
            else:
                new, renamed = target, draw(st.one_of(keys, bad_strings(name)))
            del parent[name]
            parent[renamed] = new
        elif kind == "delete":
            parent = _get(value, where[:-1])
            del parent[where[-1]]
        elif kind in ("replace", "pool"):
            new = draw(st.sampled_from(pool)) if kind == "pool" and pool else draw(hostile_values)
            value = _put(value, where, new)
        done.append(f"{kind} at {list(where)}")
    return value, done
