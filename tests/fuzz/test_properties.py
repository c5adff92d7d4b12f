"""Property-based fuzzing of every input from outside (issue 12).

For every input in ``registry.INPUTS``, a valid object built by real machines is
mutated (``mutations.mutated``) and fed to a victim restored from the same
snapshot each time. The properties:

1. only ``OlmsteadError`` subclasses escape (never a ``TypeError``, an
   ``OverflowError``, or vodozemac's ``PanicException``);
2. nothing forged is accepted: what is accepted carries the genuine sender,
   keys and content;
3. a refused input leaves the store byte for byte as it was (but for the one repair
   step a broken Olm session takes: its sender's device list marked for a query),
   and what an accepted one stored every backend can hold (no NUL, no lone
   surrogate, 64-bit integers);
4. after a refusal the genuine input (or its retry) still works.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from olmstead import OlmsteadError
from tests.fuzz.mutations import mutated
from tests.fuzz.registry import INPUTS, Built, Outcome
from tests.fuzz.world import dump, run, unstorable

COUNTS: dict[str, int] = {}


@cache
def built(name: str) -> Built:
    (entry,) = [i for i in INPUTS if i.name == name]
    return run(entry.build())


async def one_example(item: Built, obj: Any) -> None:
    victim = await item.victim.restore()
    try:
        before = dump(victim.db)
        try:
            outcome = await item.feed(victim, obj)
        except OlmsteadError as error:  # typed: allowed to escape
            note(f"refused with {type(error).__name__}: {error}")
            outcome = Outcome(False)
        assert outcome.forged is None, outcome.forged
        assert unstorable(dump(victim.db)) == [], "accepted what SQLite or PostgreSQL refuse"
        if not outcome.accepted:
            assert refusal_changes(before, dump(victim.db)) == [], "a refused input changed it"
            assert await item.genuine(victim), "after a refusal the genuine input fails"
    finally:
        await victim.machine.store.close()


def refusal_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What a refusal changed in the store, beyond the one change a refusal may make: an
    Olm message no session decrypts, from a device we do not know, marks its sender's
    device list for a query (the repair of a broken session; issue 13)."""
    changed = [name for name in before if name != "tracked_users" and before[name] != after[name]]
    old, new = before["tracked_users"], after["tracked_users"]
    changed += [
        f"tracked_users[{user!r}]"
        for user in old.keys() | new.keys()
        if old.get(user) != new.get(user) and new.get(user) is not True
    ]
    return changed


@pytest.mark.parametrize("name", [entry.name for entry in INPUTS])
def test_hostile_input_is_refused_alone_and_changes_nothing(name: str) -> None:
    item = built(name)
    run(one_example(item, item.valid))  # the valid input itself passes every property

    @given(st.data())
    def check(data: st.DataObject) -> None:
        obj, how = data.draw(mutated(item.valid, item.pool), label="mutated")
        note(f"mutations: {how}")
        COUNTS[name] = COUNTS.get(name, 0) + 1
        run(one_example(item, obj))

    check()
    print(f"{name}: {COUNTS.get(name, 0)} examples")
