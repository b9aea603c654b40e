"""/metrics: a Prometheus collector that reads the database at scrape time.

Every number comes from SQL (``status_queries.metrics_snapshot``), not from in-process counters, so one
scrape covers the receiving processes, the worker and other nodes on the same PostgreSQL database.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.registry import CollectorRegistry

from qcnode.dashboard import status_queries


class DatabaseCollector:
    """Yields qcnode's metrics from one read-only session per scrape."""

    def __init__(self, session_factory: Callable[[], Any]):
        self.session_factory = session_factory

    def collect(self) -> Iterator[Any]:
        with self.session_factory() as session:
            snap = status_queries.metrics_snapshot(session)
        yield CounterMetricFamily("qcnode_instances_received", "Instances received and stored",
                                  value=snap["instances"])
        refused = CounterMetricFamily("qcnode_instances_refused", "Objects refused at receipt, by DIMSE status",
                                      labels=["status"])
        for status, n in sorted(snap["refused"].items()):
            refused.add_metric([status], n)
        yield refused
        jobs = GaugeMetricFamily("qcnode_jobs", "Scoring jobs by state (pending and running: queue depth)",
                                 labels=["state"])
        for state, n in sorted(snap["jobs"].items()):
            jobs.add_metric([state], n)
        yield jobs
        series = GaugeMetricFamily("qcnode_series", "Series by state", labels=["state"])
        for state, n in sorted(snap["series"].items()):
            series.add_metric([state], n)
        yield series
        deliveries = GaugeMetricFamily("qcnode_deliveries", "Outbox deliveries by destination, kind and state",
                                       labels=["destination", "kind", "state"])
        for (dest, kind, state), n in sorted(snap["deliveries"].items()):
            deliveries.add_metric([dest, kind, state], n)
        yield deliveries
        verdicts = CounterMetricFamily("qcnode_results", "Scoring rounds stored, by verdict", labels=["verdict"])
        for verdict, n in sorted(snap["results"].items()):
            verdicts.add_metric([verdict], n)
        yield verdicts
        for name, doc, (buckets, total, _n) in (
                ("qcnode_scoring_latency_seconds", "Scoring job queued -> done", snap["scoring_latency"]),
                ("qcnode_sr_delivery_latency_seconds", "Last instance of a series received -> its SR delivered",
                 snap["sr_delivery_latency"])):
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)
        info = InfoMetricFamily("qcnode_model", "Model version of the latest scoring round")
        if snap["model_version"]:
            info.add_metric([], {"version": snap["model_version"]})
        yield info


def registry_for(session_factory: Callable[[], Any]) -> CollectorRegistry:
    """A registry holding only the database collector (no process metrics of whichever process serves)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory))
    return registry
