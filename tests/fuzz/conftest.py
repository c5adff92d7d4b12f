"""Hypothesis profiles for the fuzz suite.

``ci`` (the default, in ``make test``): 300 examples per registered input, a
few thousand in all, in about a minute. ``long``: ``OLMSTEAD_FUZZ=long`` runs
12,000 examples per input (over 100,000 in all); ``OLMSTEAD_FUZZ_EXAMPLES=n``
sets the count per input for either. Failures Hypothesis found are kept in its
example database (``.hypothesis/``) and replayed first on the next run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_base = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", parent=_base, max_examples=300)
settings.register_profile("long", parent=_base, max_examples=12_000)
settings.load_profile("long" if os.environ.get("OLMSTEAD_FUZZ") == "long" else "ci")
if os.environ.get("OLMSTEAD_FUZZ_EXAMPLES"):
    settings.register_profile(
        "custom",
        parent=settings.get_profile(settings._current_profile or "ci"),
        max_examples=int(os.environ["OLMSTEAD_FUZZ_EXAMPLES"]),
    )
    settings.load_profile("custom")
