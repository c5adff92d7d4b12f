"""Counters an operator can scrape: thin hooks, no-ops until a sink is installed.

olmstead calls the module-level functions below where things happen; they do
nothing unless ``install(sink)`` gave them somewhere to go. ``PrometheusMetrics``
(needs the ``metrics`` extra, PyPI ``prometheus_client``) is that sink for
Prometheus::

    from olmstead.metrics import PrometheusMetrics, install
    metrics = PrometheusMetrics()
    install(metrics)
    metrics.serve(9464)          # http://127.0.0.1:9464/metrics

Names and labels (Prometheus adds ``_total`` to each counter's name):

- ``olmstead_key_uploads``, label ``outcome``: ``ok``, ``failed``, ``conflict`` (a one-time
  key ID the server already holds).
- ``olmstead_one_time_keys_drained``: stale one-time keys of ours claimed off the server.
- ``olmstead_room_events``, label ``outcome``: ``decrypted``, or the error's class
  (``UnknownRoomKey``, ``RoomKeyWithheld``, ``ReplayedMessage``, ``MegolmDecryptionFailed``…).
- ``olmstead_store_errors``, label ``kind``: the ``StoreError`` class
  (``StoreConnectionLost``, ``StoreDiskFull``, ``StoreCorrupt``…).
- ``olmstead_lease_takeovers``: a store's lease taken back after another holder had it.
- ``olmstead_sync_loop_restarts``, label ``reason``: ``store``, ``error``, ``unexpected``.

Waiting events are not counted here: ``CryptoStore.count_waiting_events()`` tells.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Metrics",
    "PrometheusMetrics",
    "install",
    "key_upload",
    "keys_drained",
    "lease_takeover",
    "room_event",
    "store_error",
    "sync_loop_restart",
]


class Metrics:
    """Where the hooks go; every method does nothing here. Subclass it for another sink."""

    def key_upload(self, outcome: str) -> None:
        """A ``/keys/upload`` answered: ``ok``, ``failed`` or ``conflict`` (a key ID taken)."""

    def keys_drained(self, count: int) -> None:
        """``count`` stale one-time keys of ours were claimed off the server."""

    def room_event(self, outcome: str) -> None:
        """A room event was decrypted (``decrypted``) or not (the error class's name)."""

    def store_error(self, kind: str) -> None:
        """The store failed (the ``StoreError`` subclass's name)."""

    def lease_takeover(self) -> None:
        """A store took its lease back after another holder had it."""

    def sync_loop_restart(self, reason: str) -> None:
        """``Client.start`` went round again after a failure (``store``, ``error``,
        ``unexpected``)."""


_sink = Metrics()


def install(sink: Metrics | None) -> None:
    """Send every hook to ``sink`` from now on (``None``: back to doing nothing)."""
    global _sink
    _sink = sink if sink is not None else Metrics()


def key_upload(outcome: str) -> None:
    _sink.key_upload(outcome)


def keys_drained(count: int) -> None:
    _sink.keys_drained(count)


def room_event(outcome: str) -> None:
    _sink.room_event(outcome)


def store_error(kind: str) -> None:
    _sink.store_error(kind)


def lease_takeover() -> None:
    _sink.lease_takeover()


def sync_loop_restart(reason: str) -> None:
    _sink.sync_loop_restart(reason)


class PrometheusMetrics(Metrics):
    """The counters in a ``prometheus_client`` registry (its own, unless one is given).

    Raises ``ImportError`` naming the extra when ``prometheus_client`` is missing.
    """

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client as prometheus
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImportError(
                "PrometheusMetrics needs prometheus_client: pip install 'olmstead[metrics]'"
            ) from exc
        self.registry = registry if registry is not None else prometheus.CollectorRegistry()
        counter = prometheus.Counter
        self.key_uploads = counter(
            "olmstead_key_uploads", "Key uploads by outcome", ["outcome"], registry=self.registry
        )
        self.drained = counter(
            "olmstead_one_time_keys_drained",
            "Stale one-time keys of ours claimed off the server",
            registry=self.registry,
        )
        self.room_events = counter(
            "olmstead_room_events",
            "Room events decrypted, or not by reason",
            ["outcome"],
            registry=self.registry,
        )
        self.store_errors = counter(
            "olmstead_store_errors", "Store failures by kind", ["kind"], registry=self.registry
        )
        self.takeovers = counter(
            "olmstead_lease_takeovers",
            "Leases taken back after another holder had them",
            registry=self.registry,
        )
        self.restarts = counter(
            "olmstead_sync_loop_restarts",
            "Sync loop rounds after a failure, by reason",
            ["reason"],
            registry=self.registry,
        )

    def key_upload(self, outcome: str) -> None:
        self.key_uploads.labels(outcome=outcome).inc()

    def keys_drained(self, count: int) -> None:
        self.drained.inc(count)

    def room_event(self, outcome: str) -> None:
        self.room_events.labels(outcome=outcome).inc()

    def store_error(self, kind: str) -> None:
        self.store_errors.labels(kind=kind).inc()

    def lease_takeover(self) -> None:
        self.takeovers.inc()

    def sync_loop_restart(self, reason: str) -> None:
        self.restarts.labels(reason=reason).inc()

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``address:port`` from a background thread."""
        import prometheus_client as prometheus

        prometheus.start_http_server(port, address, registry=self.registry)

    def text(self) -> str:
        """The exposition text, as a scrape would get it."""
        import prometheus_client as prometheus

        return prometheus.generate_latest(self.registry).decode()
