"""The soak benchmark at a small size, so it never rots: it runs, and its figures add up.

No memory target is asserted here (2,000 events say nothing about months); the
benchmark itself fails if any event does not decrypt.
"""

from __future__ import annotations

from benchmarks.soak import report, run


async def test_soak_runs_and_counts_the_store() -> None:
    result = await run(2_000, batch=100)
    assert result.rss_start > 0
    assert result.rss_end > 0
    assert result.warm_events == 200
    rows = {t.table: t.rows for t in result.store_end}
    warm = {t.table: t.rows for t in result.store_warm}
    # one replay record per decrypted event, one room key per 100 (the rotation)
    assert rows["megolm_message_indices"] == 2_000
    assert rows["megolm_message_indices"] - warm["megolm_message_indices"] == 1_800
    assert rows["inbound_group_sessions"] == 20
    text = report(result)
    assert "per 100,000 events" in text
    assert "megolm_message_indices" in text
