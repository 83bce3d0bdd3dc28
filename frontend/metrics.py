"""Prometheus metrics: this frontend process's HTTP counters plus gauges from the broker's mmi.stats.

One `CollectorRegistry` per app (no process-global registry). With several Sanic workers each
process counts its own requests; the broker gauges are the same from every process.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.protocol import MODEL_STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


class Metrics:
    """HTTP-side metrics of one frontend process. Seconds for durations."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("grounding_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("grounding_http_request_seconds", "HTTP request latency (to the last byte)",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("grounding_http_inflight_requests", "HTTP requests being served", registry=r)
        self.jobs = Counter("grounding_jobs", "Grounding jobs by model and outcome (stop or an error code)",
                            ["model", "outcome"], registry=r)
        self.job_latency = Histogram("grounding_job_seconds", "Submit to final result, per model",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.disconnects = Counter("grounding_client_disconnects", "Jobs cancelled because the HTTP client left",
                                   registry=r)
        self.screenshot_cache_hits = Counter(
            "grounding_screenshot_cache_hits", "Answered jobs whose screenshot state came from the worker's cache",
            ["model"], registry=r)
        self.prefills = Counter(
            "grounding_screenshot_prefills", "POST /v1/screenshots by model and outcome (kept, already_kept, "
            "not_kept or an error code)", ["model", "outcome"], registry=r)
        self.resubmits = Counter("grounding_resubmits", "Jobs resubmitted once after a broker restart",
                                 registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self, stats: Mapping[str, Any] | None, client_counters: Mapping[str, int] | None = None) -> bytes:
        """Exposition text: this process's metrics and its broker client's counters
        (common/client.py), then the broker's (absent when unreachable)."""
        broker = CollectorRegistry(auto_describe=False)
        broker.register(_BrokerCollector(stats))
        client = CollectorRegistry(auto_describe=False)
        client.register(_ClientCollector(client_counters or {}))
        return generate_latest(self.registry) + generate_latest(client) + generate_latest(broker)


class _ClientCollector:
    """This process's broker client: answers that came straight from a worker, dropped messages."""

    def __init__(self, counters: Mapping[str, int]):
        self.counters = counters

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("grounding_client_events", "Broker client counters by name", labels=["name"])
        for name, n in sorted(self.counters.items()):
            family.add_metric([_NAME_OK.sub("_", str(name))], float(n))
        yield family


class _BrokerCollector:
    """Gauges built from one mmi.stats reply (architecture.md section 10)."""

    def __init__(self, stats: Mapping[str, Any] | None):
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        up = GaugeMetricFamily("grounding_broker_up", "1 when the broker answered mmi.stats")
        up.add_metric([], 1.0 if s else 0.0)
        yield up
        if not s:
            return
        uptime = GaugeMetricFamily("grounding_broker_uptime_seconds", "Broker uptime")
        uptime.add_metric([], float(s.get("uptime_s", 0)))
        yield uptime
        models = s.get("models") or {}
        qd = GaugeMetricFamily("grounding_queue_depth", "Queued jobs per model", labels=["model"])
        inf = GaugeMetricFamily("grounding_inflight", "Dispatched jobs per model", labels=["model"])
        state = GaugeMetricFamily("grounding_model_state", "1 for the model's current state",
                                  labels=["model", "state"])
        mem = GaugeMetricFamily("grounding_model_memory_bytes", "Model memory by kind",
                                labels=["model", "kind"])
        for mid, m in sorted(models.items()):
            qd.add_metric([mid], float(m.get("queue_depth", 0)))
            inf.add_metric([mid], float(m.get("inflight", 0)))
            for st in MODEL_STATES:
                state.add_metric([mid, st], 1.0 if m.get("state") == st else 0.0)
            for kind, v in sorted((m.get("memory") or {}).items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    mem.add_metric([mid, str(kind).removesuffix("_bytes")], float(v))
        yield from (qd, inf, state, mem)
        memory = s.get("memory") or {}
        for key in ("budget", "committed"):
            if isinstance(memory.get(key), (int, float)):
                g = GaugeMetricFamily(f"grounding_memory_{key}_bytes", f"Broker memory {key}")
                g.add_metric([], float(memory[key]))
                yield g
        if memory.get("devices"):    # models with replicas: each GPU's own budget
            dev = GaugeMetricFamily("grounding_device_memory_bytes", "Broker memory budget and committed bytes per GPU",
                                    labels=["device", "kind"])
            for d in memory["devices"]:
                for key in ("budget", "committed"):
                    if isinstance(d, dict) and isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool):
                        dev.add_metric([str(d.get("device")), key], float(d[key]))
            yield dev
        counters = CounterMetricFamily("grounding_broker_events", "Broker counters by name", labels=["name"])
        for name, n in sorted((s.get("counters") or {}).items()):
            if isinstance(n, (int, float)) and not isinstance(n, bool):
                counters.add_metric([_NAME_OK.sub("_", str(name))], float(n))
        yield counters
