"""The worker's Prometheus metrics.

Counted where things happen (fits, predictions sent, dead letters, checkpoints) and, for what
campaign state already counts (readings applied, requests issued, in flight, expired, failed,
live model quality, lag), read from a snapshot that the worker's timer takes on the event loop:
the scrape runs on the health server's thread and never touches campaign state.

Names (all prefixed ``labloop_``): ``consumer_lag{topic,partition}``, ``readings_total``,
``readings_per_second``, ``fit_seconds`` (histogram), ``predictions_total``, ``requests_total``,
``requests_in_flight{campaign}``, ``requests_expired_total``, ``requests_failed_total``,
``dead_letters_total{error_class,stage}``, ``checkpoint_age_seconds``,
``model_version{campaign}``, ``model_live{campaign,measure}`` (measure: rmse, nll, coverage90,
spearman, n).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from labloop.consumers.health import Rate

__all__ = ["WorkerMetrics"]

_FIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Snapshot(Collector):
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.rate = Rate()

    def set(self, data: dict[str, Any]) -> None:
        self.rate.update(data.get("readings", 0))
        self.data = data  # one reference swap: a scrape sees a whole snapshot or the one before

    def collect(self) -> Iterator[Any]:
        d = self.data
        lag = GaugeMetricFamily("labloop_consumer_lag", "messages behind the high watermark, per input partition",
                                labels=["topic", "partition"])
        for (topic, part), n in sorted(d.get("lag", {}).items()):
            lag.add_metric([topic, str(part)], n)
        yield lag
        yield CounterMetricFamily("labloop_readings", "readings applied to campaigns (accepted, distinct)",
                                  value=d.get("readings", 0))
        yield GaugeMetricFamily("labloop_readings_per_second", "readings applied per second, between the last two "
                                "snapshots", value=self.rate.value)
        yield CounterMetricFamily("labloop_requests", "experiment requests issued", value=d.get("issued", 0))
        yield CounterMetricFamily("labloop_requests_expired", "requests that expired unanswered",
                                  value=d.get("expired", 0))
        yield CounterMetricFamily("labloop_requests_failed", "requests a robot reported FAILED",
                                  value=d.get("failed", 0))
        flight = GaugeMetricFamily("labloop_requests_in_flight", "requests issued, not yet measured, failed or "
                                   "expired", labels=["campaign"])
        version = GaugeMetricFamily("labloop_model_version", "the campaign's model version", labels=["campaign"])
        live = GaugeMetricFamily("labloop_model_live", "prospective accuracy over the latest scored readings "
                                 "(each scored by the model before it saw it)", labels=["campaign", "measure"])
        for cid, c in sorted(d.get("campaigns", {}).items()):
            flight.add_metric([cid], c["in_flight"])
            version.add_metric([cid], c["model_version"])
            for measure, value in c["live"].items():
                if value is not None:
                    live.add_metric([cid, measure], float(value))
        yield flight
        yield version
        yield live
        age = d.get("checkpoint_age_s")
        if age is not None:
            yield GaugeMetricFamily("labloop_checkpoint_age_seconds", "seconds since the last checkpoint was written (or restored; since the worker started, before any)",
                                    value=age)


class WorkerMetrics:
    """The worker's registry: :attr:`fit`, :attr:`predictions` and :attr:`dead_letters` are
    updated where they happen; :meth:`snapshot` takes the rest."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fit = Histogram("labloop_fit_seconds", "model update time: fit and pool scoring", buckets=_FIT_BUCKETS,
                             registry=self.registry)
        self.predictions = Counter("labloop_predictions", "pool rows' predictions published (those that moved, "
                                   "see prediction_tolerance)", registry=self.registry)
        self.dead_letters = Counter("labloop_dead_letters", "dead letters sent, by error class and stage",
                                    ["error_class", "stage"], registry=self.registry)
        self._snap = _Snapshot()
        self.registry.register(self._snap)

    def snapshot(self, engine: Any, lag: dict[tuple[str, int], int], checkpoint_at: float | None) -> None:
        """Read campaign state (on the event loop, with no fit changing it: counts only).

        Args:
            engine: the :class:`~labloop.streams.engine.CampaignEngine`.
            lag: messages behind per ``(topic, partition)``.
            checkpoint_at: ``time.time()`` of the last checkpoint written, None if none yet.
        """
        campaigns: dict[str, Any] = {}
        readings = issued = expired = failed = 0
        for cid in list(engine):
            rt = engine.get(cid)
            if rt is None:
                continue
            statuses = [r.status for r in rt.requests.values()]
            readings += rt.n_readings
            issued += rt.n_issued
            expired += statuses.count("EXPIRED")
            failed += statuses.count("FAILED")
            campaigns[cid] = {
                "in_flight": sum(s in ("REQUESTED", "ACCEPTED", "STARTED") for s in statuses),
                "model_version": rt.pool.model_version if rt.pool is not None else 0,
                "live": rt.live.summary()}
        self._snap.set({"lag": dict(lag), "readings": readings, "issued": issued, "expired": expired,
                        "failed": failed, "campaigns": campaigns,
                        "checkpoint_age_s": None if checkpoint_at is None else max(0.0, time.time() - checkpoint_at)})
