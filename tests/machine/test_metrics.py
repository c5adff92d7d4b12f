"""Metrics: no-ops by default; with Prometheus installed the hooks count what happened."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.soak import run
from olmstead import Changes, PickleKey, SqliteStore, StoreFileReplaced, metrics
from olmstead.metrics import PrometheusMetrics

KEY = PickleKey(b"x" * 32)


@pytest.fixture
def prometheus() -> Iterator[PrometheusMetrics]:
    sink = PrometheusMetrics()
    metrics.install(sink)
    try:
        yield sink
    finally:
        metrics.install(None)


def value(sink: PrometheusMetrics, name: str, **labels: str) -> float:
    found = sink.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_room_events_and_key_uploads_are_counted(prometheus: PrometheusMetrics) -> None:
    await run(300, batch=100)  # two devices upload their keys, 300 events decrypt
    assert value(prometheus, "olmstead_room_events_total", outcome="decrypted") == 300
    assert value(prometheus, "olmstead_key_uploads_total", outcome="ok") == 2


async def test_store_errors_are_counted_by_kind(
    prometheus: PrometheusMetrics, tmp_path: Path
) -> None:
    store = await SqliteStore.open(tmp_path / "gone.db", KEY)
    (tmp_path / "gone.db").unlink()
    with pytest.raises(StoreFileReplaced):
        await store.save_changes(Changes(values={"x": "1"}))
    await store.close()
    assert value(prometheus, "olmstead_store_errors_total", kind="StoreFileReplaced") >= 1


async def test_the_endpoint_serves_the_documented_names(prometheus: PrometheusMetrics) -> None:
    metrics.sync_loop_restart("store")
    metrics.lease_takeover()
    metrics.keys_drained(3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prometheus.serve(port)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for name in (
        'olmstead_sync_loop_restarts_total{reason="store"} 1.0',
        "olmstead_lease_takeovers_total 1.0",
        "olmstead_one_time_keys_drained_total 3.0",
        "olmstead_key_uploads_total",
        "olmstead_room_events_total",
        "olmstead_store_errors_total",
    ):
        assert name in text


def test_without_a_sink_the_hooks_do_nothing() -> None:
    metrics.install(None)
    metrics.room_event("decrypted")  # no registry anywhere: nothing to raise or count
    assert type(metrics._sink) is metrics.Metrics
